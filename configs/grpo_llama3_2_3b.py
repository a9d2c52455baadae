"""GRPO baseline on Llama-3.2-3B-Instruct: prompts from a prompt set instead of the Challenger.

Same settings as configs/lsp_llama3_2_3b.py (read its docstring), with game.mode=grpo
and lr 1e-6. The paper ran it on Alpaca prompts with TRL: set
--config.data.prompts=PATH to an AlpacaEval-format JSON or a JSONL prompt file.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "lsp_llama3_2_3b", os.path.join(os.path.dirname(__file__), "lsp_llama3_2_3b.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    return _base.get_config("grpo")
