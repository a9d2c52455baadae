"""LSP-Zero on Llama-3.2-3B-Instruct: the zero-sum game, no quality self-reward.

Same settings as configs/lsp_llama3_2_3b.py (read its docstring), with game.mode=lsp_zero.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "lsp_llama3_2_3b", os.path.join(os.path.dirname(__file__), "lsp_llama3_2_3b.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    return _base.get_config("lsp_zero")
