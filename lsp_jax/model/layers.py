"""Llama building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsp_jax.model.config import LoraConfig
from lsp_jax.runtime import sharding

# Large negative logit for masked attention slots. Finite, so a row with every slot
# masked (a padding query) gives a uniform softmax rather than NaN.
_MASKED = -1e30


# Logical names of activation axes; the config's rules map them to mesh axes (rows over
# data x fsdp). Without rules in context (nn.logical_axis_rules) these are no-ops.
BTD = ("activation_batch", "activation_length", "activation_embed")
BTNH = ("activation_batch", "activation_length", "activation_heads", None)
BTKH = ("activation_batch", "activation_length", "activation_kv_heads", None)
BTF = ("activation_batch", "activation_length", "activation_mlp")
CACHE_LBSKH = (None, "activation_batch", None, "activation_kv_heads", None)
CACHE_BS = ("activation_batch", None)


def constrain(x, names):
    """Constrains activation `x` to the layout the logical-axis rules in context give
    `names`, dropping any mesh axis that does not divide its dimension (e.g. the single
    shared prompt of the Challenger's loss, a batch of 1, stays whole rather than being
    padded over the data axis). A no-op without rules or outside a mesh."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, sharding.spec_for(names, x.shape, mesh, rules))


def _weight(module: nn.Module, name: str, shape, axes, param_dtype):
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)
    return module.param(name, init, shape, param_dtype)


def _adapter(module: nn.Module, name: str, in_shape, in_axes, out_shape, out_axes, lora, dtype):
    """(A, B): the LoRA factors of kernel `name` (A [*in, R], B [R, *out]; the rank axis
    replicated, the others sharded like the kernel's), or None when it is not adapted.
    A is drawn as PEFT draws it (kaiming-uniform, bound 1/sqrt(fan_in)), B is zero: the
    adapted model starts equal to the base."""
    if not lora.adapts(name):
        return None
    in_dims = tuple(range(len(in_shape)))
    init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_dims, -1)
    a = module.param(
        f"{name}_lora_a",
        nn.with_logical_partitioning(init_a, (*in_axes, "lora_rank")),
        (*in_shape, lora.rank),
        dtype,
    )
    b = module.param(
        f"{name}_lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *out_axes)),
        (lora.rank, *out_shape),
        dtype,
    )
    return a, b


def add_adapter(y, x, factors, specs, scale, dtype):
    """y + scale · (x A) B for factors (A, B) and einsum specs (x·A, xA·B); y itself
    when there are no factors. Never forms A B: the rank-R path costs R/D of the kernel."""
    if factors is None:
        return y
    a, b = factors
    xa = jnp.einsum(specs[0], x, a.astype(dtype))
    return y + scale * jnp.einsum(specs[1], xa, b.astype(dtype))


def at_least_float32(dtype):
    """float32 for bf16/f16/f32 activations, float64 for a float64 model (a reference
    run that compares against transformers in float64)."""
    return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BTD):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale_D = self.param("scale", init, (x_BTD.shape[-1],), self.param_dtype)
        # Statistics in float32 at least: a bf16 mean of squares loses most of its mantissa.
        stats = at_least_float32(self.dtype)
        x_BTD = x_BTD.astype(stats)
        x_BTD = x_BTD * jax.lax.rsqrt(jnp.mean(x_BTD**2, axis=-1, keepdims=True) + self.eps)
        scale_11D = scale_D.astype(stats).reshape((1,) * (x_BTD.ndim - 1) + (-1,))
        return (x_BTD * scale_11D).astype(self.dtype)


def rope_angles(positions_BT, inv_freq_h):
    """Rotation angles [B, T, H/2] (float32) of each position for each frequency."""
    inv_freq_11h = inv_freq_h.astype(jnp.float32)[None, None, :]
    return positions_BT.astype(jnp.float32)[..., None] * inv_freq_11h


def apply_rope(x_BTNH, angles_BTh):
    """Rotates the two halves of the head dimension (Hugging Face's half-split layout)."""
    # Angles in float32 (as transformers): at positions ~1e5 lower precision loses the
    # low bits that set the rotation. The rotation itself in float32 at least.
    wide = at_least_float32(x_BTNH.dtype)
    sin_BT1h = jnp.sin(angles_BTh).astype(wide)[:, :, None, :]
    cos_BT1h = jnp.cos(angles_BTh).astype(wide)[:, :, None, :]
    x1_BTNh, x2_BTNh = jnp.split(x_BTNH.astype(wide), 2, axis=-1)
    rotated_BTNH = jnp.concatenate(
        [x1_BTNh * cos_BT1h - x2_BTNh * sin_BT1h, x2_BTNh * cos_BT1h + x1_BTNh * sin_BT1h],
        axis=-1,
    )
    return rotated_BTNH.astype(x_BTNH.dtype)


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Grouped-query attention: each of the K kv heads serves N/K query heads, with
    no copy of K or V."""
    batch, length, num_heads, head_dim = q_BTNH.shape
    num_kv = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    # Logits and softmax in float32 (at least): bf16 logits saturate the exponent for long
    # contexts.
    logits_BKGTS = jnp.einsum(
        "BTKGH,BSKH->BKGTS",
        q_BTKGH,
        k_BSKH,
        preferred_element_type=at_least_float32(q_BTKGH.dtype),
    )
    logits_BKGTS = logits_BKGTS * (head_dim**-0.5)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, _MASKED)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
    """Multi-head attention with grouped kv heads and an optional KV cache slice."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Any
    param_dtype: Any
    lora: LoraConfig = LoraConfig()

    @nn.compact
    def __call__(self, x_BTD, angles_BTh, mask_BTS, kv=None, write_index=None):
        """Args:
          x_BTD: input activations.
          angles_BTh: rotary angles of the T positions.
          mask_BTS: which key slots each query may attend to (S = T without a cache).
          kv: optional (k_BSKH, v_BSKH) cache of this layer (read only).
          write_index: int32 [] slot of the first of the T new keys.

        Returns:
          (out_BTD, kv'): kv' = (k_BTKH, v_BTKH), the new keys and values for the caller
          to write at `write_index` (None without a cache).
        """
        dim = x_BTD.shape[-1]
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        wq_DNH = _weight(self, "q", (dim, n, h), ("embed", "heads", "head_dim"), self.param_dtype)
        wk_DKH = _weight(
            self, "k", (dim, k, h), ("embed", "kv_heads", "head_dim"), self.param_dtype
        )
        wv_DKH = _weight(
            self, "v", (dim, k, h), ("embed", "kv_heads", "head_dim"), self.param_dtype
        )
        wo_NHD = _weight(self, "o", (n, h, dim), ("heads", "head_dim", "embed"), self.param_dtype)
        lora, dt = self.lora, self.dtype
        embed, heads, kv_heads = ("embed",), ("heads", "head_dim"), ("kv_heads", "head_dim")
        adapter = lambda name, *shapes: _adapter(self, name, *shapes, lora, self.param_dtype)
        q_ab = adapter("q", (dim,), embed, (n, h), heads)
        k_ab = adapter("k", (dim,), embed, (k, h), kv_heads)
        v_ab = adapter("v", (dim,), embed, (k, h), kv_heads)
        o_ab = adapter("o", (n, h), heads, (dim,), embed)
        scale = lora.scale if lora.rank else 1
        to_heads, to_kv = ("BTD,DR->BTR", "BTR,RNH->BTNH"), ("BTD,DR->BTR", "BTR,RKH->BTKH")
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, wq_DNH.astype(dt))
        q_BTNH = add_adapter(q_BTNH, x_BTD, q_ab, to_heads, scale, dt)
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, wk_DKH.astype(dt))
        k_BTKH = add_adapter(k_BTKH, x_BTD, k_ab, to_kv, scale, dt)
        v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, wv_DKH.astype(dt))
        v_BTKH = add_adapter(v_BTKH, x_BTD, v_ab, to_kv, scale, dt)
        q_BTNH = constrain(apply_rope(q_BTNH, angles_BTh), BTNH)
        k_BTKH = constrain(apply_rope(k_BTKH, angles_BTh), BTKH)
        v_BTKH = constrain(v_BTKH, BTKH)
        if kv is None:
            out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, mask_BTS)
        else:
            k_BSKH, v_BSKH = kv
            kv = (k_BTKH.astype(k_BSKH.dtype), v_BTKH.astype(v_BSKH.dtype))
            # Attend over a copy of the first `bound` slots with the new keys in place;
            # the cache itself gets only the T new entries (written once for all layers
            # by the caller), so a decode step does not copy the whole cache.
            bound = mask_BTS.shape[-1]
            start = (0, write_index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(k_BSKH[:, :bound], kv[0], start)
            v_BSKH = jax.lax.dynamic_update_slice(v_BSKH[:, :bound], kv[1], start)
            k_BSKH, v_BSKH = constrain(k_BSKH, BTKH), constrain(v_BSKH, BTKH)
            out_BTNH = attend(
                q_BTNH, k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype), mask_BTS
            )
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, wo_NHD.astype(dt))
        out_BTD = add_adapter(out_BTD, out_BTNH, o_ab, ("BTNH,NHR->BTR", "BTR,RD->BTD"), scale, dt)
        return out_BTD, kv


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    mlp_dim: int
    dtype: Any
    param_dtype: Any
    lora: LoraConfig = LoraConfig()

    @nn.compact
    def __call__(self, x_BTD):
        dim = x_BTD.shape[-1]
        f, lora, dt = self.mlp_dim, self.lora, self.dtype
        gate_DF = _weight(self, "gate", (dim, f), ("embed", "mlp"), self.param_dtype)
        up_DF = _weight(self, "up", (dim, f), ("embed", "mlp"), self.param_dtype)
        down_FD = _weight(self, "down", (f, dim), ("mlp", "embed"), self.param_dtype)
        adapter = lambda name, *shapes: _adapter(self, name, *shapes, lora, self.param_dtype)
        gate_ab = adapter("gate", (dim,), ("embed",), (f,), ("mlp",))
        up_ab = adapter("up", (dim,), ("embed",), (f,), ("mlp",))
        down_ab = adapter("down", (f,), ("mlp",), (dim,), ("embed",))
        scale = lora.scale if lora.rank else 1
        to_mlp = ("BTD,DR->BTR", "BTR,RF->BTF")
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, gate_DF.astype(dt))
        gate_BTF = add_adapter(gate_BTF, x_BTD, gate_ab, to_mlp, scale, dt)
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, up_DF.astype(dt))
        up_BTF = add_adapter(up_BTF, x_BTD, up_ab, to_mlp, scale, dt)
        hidden_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, BTF)
        out_BTD = jnp.einsum("BTF,FD->BTD", hidden_BTF, down_FD.astype(dt))
        return add_adapter(out_BTD, hidden_BTF, down_ab, ("BTF,FR->BTR", "BTR,RD->BTD"), scale, dt)
