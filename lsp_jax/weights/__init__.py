"""Checkpoint formats in and out: Hugging Face safetensors folders (and GGUF files)."""

from lsp_jax.weights.hf import load_hf, save_hf
from lsp_jax.weights.layout import (
    hf_state_from_params,
    params_from_hf_state,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "hf_state_from_params",
    "load_hf",
    "params_from_hf_state",
    "save_hf",
    "stack_layers",
    "unstack_layers",
]
from lsp_jax.weights.gguf import load_gguf as load_gguf  # noqa: E402
