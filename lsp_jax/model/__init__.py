"""Flax Llama models.

Dimension legend used in names throughout lsp_jax (`x_BTD`, `k_BSKH`, einsum strings):
  B batch            T query length        S key / cache length
  D model width      N query heads         K kv heads
  G query heads per kv head (in attention)  H head dim
  F MLP hidden       V vocabulary          L layers
  R LoRA rank (model.lora)
  C classifier outputs
In the self-play game N and G also name the queries per iteration and the answers per
query (docs/algorithm.md); game code spells those out where both could be meant.
"""

from lsp_jax.model.config import LlamaConfig, LoraConfig, RopeScaling
from lsp_jax.model.llama import (
    KVCache,
    Llama,
    SharedPrefixLlama,
    constrain_cache,
    default_positions,
    init_cache,
    param_axes,
    sequence_scores,
    unembedding,
    vocab_logits,
)

__all__ = [
    "KVCache",
    "Llama",
    "SharedPrefixLlama",
    "LlamaConfig",
    "LoraConfig",
    "RopeScaling",
    "default_positions",
    "unembedding",
    "vocab_logits",
    "init_cache",
    "constrain_cache",
    "param_axes",
    "sequence_scores",
]
