"""LoRA adapters as parameter trees: split from the base, combined with it, merged
into it, and initialised.

The adapters of kernel `q` are the leaves `q_lora_a` [*in, R] and `q_lora_b` [R, *out]
next to it (lsp_jax.model.layers); with scanned layers both carry the leading L axis.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from lsp_jax.model.config import LlamaConfig, LoraConfig
from lsp_jax.model.llama import Llama

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"


def is_adapter(name: str) -> bool:
    return name.endswith((A_SUFFIX, B_SUFFIX))


def _partition(tree, keep):
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = _partition(value, keep)
            if sub:
                out[key] = sub
        elif keep(key):
            out[key] = value
    return out


def split(params) -> tuple[dict, dict]:
    """(base, adapters): the parameters without and with only the adapter leaves, each
    nested as in `params` (leaves may be arrays, shapes or flax boxes)."""
    return _partition(params, lambda k: not is_adapter(k)), _partition(params, is_adapter)


def combine(base, adapters) -> dict:
    """The parameters of the adapted model: `base` with the `adapters` leaves added."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(base.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


def base_config(config: LlamaConfig) -> LlamaConfig:
    """The architecture without adapters (the reference model, the merged export)."""
    return config.replace(lora=LoraConfig())


def _merged_kernel(w, a, b, scale):
    """W + scale · A B in float32 at least (a bfloat16 base would round the delta
    away); a, b and w may carry a leading layer axis."""
    w, a, b = (np.asarray(x) for x in (w, a, b))
    wide = np.promote_types(np.promote_types(w.dtype, a.dtype), np.float32)
    a, b = a.astype(wide), b.astype(wide)
    if w.ndim == a.ndim + b.ndim - 2:
        delta = np.tensordot(a, b, axes=1)
    else:  # Scanned layers: one product per layer.
        delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
    return w.astype(wide) + scale * delta


def merge(config: LlamaConfig, params, *, dtype=None) -> tuple[LlamaConfig, dict]:
    """(base architecture, parameters with each adapter folded into its kernel: W +
    (alpha/rank) A B), host numpy; every leaf cast to `dtype` (default: the config's
    param_dtype). Parameters without adapters come back as they are."""
    if not config.lora.rank:
        return config, params
    dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    scale = config.lora.scale

    def visit(tree):
        out = {}
        for key, value in tree.items():
            if isinstance(value, Mapping):
                out[key] = visit(value)
            elif f"{key}{A_SUFFIX}" in tree:
                a, b = tree[f"{key}{A_SUFFIX}"], tree[f"{key}{B_SUFFIX}"]
                out[key] = _merged_kernel(value, a, b, scale).astype(dtype)
            elif not is_adapter(key):
                out[key] = np.asarray(value).astype(dtype, copy=False)
        return out

    return base_config(config), visit(meta.unbox(params))


def init_adapters(config: LlamaConfig, seed: int) -> dict:
    """The adapters of `config` as its init draws them (A random, B zero), host numpy.
    Only the adapters are computed: the base's initialisers are dead code in the
    compiled program."""

    def init():
        tokens = jnp.zeros((1, 1), jnp.int32)
        params = Llama(config).init(jax.random.key(seed), tokens)["params"]
        return split(meta.unbox(params))[1]

    return jax.device_get(jax.jit(init)())
