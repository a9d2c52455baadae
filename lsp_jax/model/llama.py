"""The Llama transformer (causal LM or sequence classifier) with an explicit KV cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lsp_jax.model.config import LlamaConfig
from lsp_jax.model.layers import (
    BTD,
    CACHE_BS,
    CACHE_LBSKH,
    MLP,
    Attention,
    RMSNorm,
    at_least_float32,
    constrain,
    rope_angles,
)


@struct.dataclass
class KVCache:
    """Keys and values of every layer, preallocated for S slots.

    Rows are left-aligned in slots: every row writes its t-th new token to slot
    `end + t`, so one scalar `end` serves the batch; `mask_BS` says which slots hold
    real (non-pad) tokens.
    """

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    mask_BS: jax.Array
    end: jax.Array

    @property
    def num_slots(self) -> int:
        return self.mask_BS.shape[1]


def init_cache(config: LlamaConfig, batch: int, num_slots: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `num_slots` tokens."""
    shape = (config.num_layers, batch, num_slots, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return constrain_cache(
        KVCache(
            k_LBSKH=jnp.zeros(shape, dtype),
            v_LBSKH=jnp.zeros(shape, dtype),
            mask_BS=jnp.zeros((batch, num_slots), bool),
            end=jnp.zeros((), jnp.int32),
        )
    )


def constrain_cache(cache: KVCache) -> KVCache:
    """Lays a cache out like the activations that fill it: rows as 'activation_batch',
    kv heads as 'activation_kv_heads' (the rules in context map them to mesh axes), so
    a decode loop's carried cache stays where its attention reads it."""
    return cache.replace(
        k_LBSKH=constrain(cache.k_LBSKH, CACHE_LBSKH),
        v_LBSKH=constrain(cache.v_LBSKH, CACHE_LBSKH),
        mask_BS=constrain(cache.mask_BS, CACHE_BS),
    )


def param_axes(config: LlamaConfig):
    """The logical axis names of every parameter: a tree shaped like the parameters with
    a tuple of names per array, which a rules table maps to mesh axes."""
    init = lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    boxed = jax.eval_shape(init)["params"]
    return jax.tree.map(
        lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def _write_cache(kv_all, new_kv, write_index):
    """Writes every layer's T new keys and values ([L, B, T, K, H]) into the cache at
    slot `write_index` with one in-place update each (None without a cache)."""
    if kv_all is None:
        return None
    start = (0, 0, write_index, 0, 0)
    return tuple(jax.lax.dynamic_update_slice(a, n, start) for a, n in zip(kv_all, new_kv))


def default_positions(mask_BT, offset_B=None):
    """Positions of a left-padded batch: real tokens count 0, 1, ...; pads get 0."""
    positions_BT = jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1
    if offset_B is not None:
        positions_BT = positions_BT + offset_B[:, None]
    return jnp.maximum(positions_BT, 0)


def sequence_scores(scores_BTC, mask_BT):
    """Classifier outputs [B, C] read at each row's last real token (as transformers'
    LlamaForSequenceClassification does, which also handles left padding)."""
    length = mask_BT.shape[1]
    last_B = jnp.argmax(jnp.where(mask_BT, jnp.arange(length)[None, :], -1), axis=-1)
    return jnp.take_along_axis(scores_BTC, last_B[:, None, None], axis=1)[:, 0]


def unembedding(config: LlamaConfig, params) -> tuple[jax.Array, str]:
    """The LM head as (matrix, layout): the embedding table [V, D] ('VD') when tied, else
    the lm_head kernel [D, V] ('DV'). Multiplying in the stored layout matters: a head
    written as `embedding.T` makes XLA copy the transposed table (113 MB for SmolLM2) in
    every decode step."""
    if config.tie_embeddings:
        return params["embed"]["embedding"], "VD"
    return params["lm_head"]["kernel"], "DV"


def vocab_logits(config: LlamaConfig, params, x_xD) -> jax.Array:
    """Next-token logits [..., V] of final hidden states [..., D], float32 (float64 for a
    float64 model)."""
    matrix, layout = unembedding(config, params)
    spec = "...D,VD->...V" if layout == "VD" else "...D,DV->...V"
    logits = jnp.einsum(spec, x_xD, matrix.astype(config.dtype))
    return logits.astype(at_least_float32(config.dtype))


class Weight(nn.Module):
    """A single named parameter (embedding table, LM or score head)."""

    param_name: str
    shape: tuple
    axes: tuple
    param_dtype: object

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), self.axes)
        return self.param(self.param_name, init, self.shape, self.param_dtype)


class Block(nn.Module):
    """Pre-norm transformer block: attention then SwiGLU MLP, each residual."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, kv, angles_BTh, mask_BTS, write_index):
        cfg = self.config
        norm = dict(eps=cfg.rms_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        attention = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            lora=cfg.lora,
            name="attn",
        )
        attn_BTD, kv = attention(
            RMSNorm(**norm, name="attn_norm")(x_BTD), angles_BTh, mask_BTS, kv, write_index
        )
        x_BTD = x_BTD + attn_BTD
        mlp = MLP(cfg.mlp_dim, cfg.dtype, cfg.param_dtype, lora=cfg.lora, name="mlp")
        x_BTD = x_BTD + mlp(RMSNorm(**norm, name="mlp_norm")(x_BTD))
        return constrain(x_BTD, BTD), kv


class Llama(nn.Module):
    """Llama decoder. Without a cache, `apply(vars, tokens_BT)` returns float32 logits
    [B, T, V] (or classifier scores [B, T, C] when `config.num_labels` > 0); with a
    cache it returns (logits, cache')."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        *,
        positions_BT=None,
        mask_BT=None,
        cache: KVCache | None = None,
        attend_bound: int | None = None,
        return_hidden: bool = False,
    ):
        """Args:
        tokens_BT: int token ids.
        positions_BT: RoPE positions; by default counted over real tokens (mask_BT),
          continuing from the tokens already in the cache.
        mask_BT: True for real tokens, False for padding (default all True).
        cache: a KVCache to append the T tokens to (prefill or decode).
        attend_bound: static; with a cache, attend only to its first `attend_bound`
          slots (all new tokens must land below it). Bounds decode cost by the
          filled length instead of the cache size.
        return_hidden: return the final normed hidden states [B, T, D] instead of
          logits (for memory-light, chunked log-probs).
        """
        cfg = self.config
        if mask_BT is None:
            mask_BT = jnp.ones(tokens_BT.shape, bool)
        mask_BT = mask_BT.astype(bool)
        angles, mask_BTS, write_index, slot_mask = self._geometry(
            mask_BT, positions_BT, cache, attend_bound
        )
        embedding_VD = Weight(
            "embedding",
            (cfg.vocab_size, cfg.dim),
            ("vocab", "embed"),
            cfg.param_dtype,
            name="embed",
        )()
        x_BTD = constrain(jnp.take(embedding_VD, tokens_BT, axis=0).astype(cfg.dtype), BTD)
        x_BTD, kv = self._blocks(x_BTD, cache, angles, mask_BTS, write_index)
        x_BTD = RMSNorm(cfg.rms_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x_BTD)
        out = x_BTD if return_hidden else self._head(x_BTD, embedding_VD)
        if cache is None:
            return out
        end = cache.end + tokens_BT.shape[1]
        return out, KVCache(k_LBSKH=kv[0], v_LBSKH=kv[1], mask_BS=slot_mask, end=end)

    def _geometry(self, mask_BT, positions_BT, cache, attend_bound):
        """RoPE angles, the attention mask, and where new keys go in the cache."""
        length = mask_BT.shape[1]
        if cache is None:
            if positions_BT is None:
                positions_BT = default_positions(mask_BT)
            causal_TT = jnp.tril(jnp.ones((length, length), bool))
            mask_BTS = causal_TT[None] & mask_BT[:, None, :]
            write_index, slot_mask_BS = None, None
        else:
            if positions_BT is None:
                positions_BT = default_positions(mask_BT, cache.mask_BS.sum(-1))
            write_index = cache.end
            slot_mask_BS = jax.lax.dynamic_update_slice(cache.mask_BS, mask_BT, (0, write_index))
            bound = attend_bound or cache.num_slots
            slot_S = jnp.arange(bound)
            query_slot_T = write_index + jnp.arange(length)
            visible_TS = slot_S[None, :] <= query_slot_T[:, None]
            mask_BTS = visible_TS[None] & slot_mask_BS[:, None, :bound]
        angles_BTh = rope_angles(positions_BT, jnp.asarray(self.config.rope_inv_freq()))
        return angles_BTh, mask_BTS, write_index, slot_mask_BS

    def _blocks(self, x_BTD, cache, angles_BTh, mask_BTS, write_index):
        cfg = self.config
        block_cls = Block
        if cfg.remat:
            block_cls = nn.remat(Block, prevent_cse=not cfg.scan_layers)
        kv_all = None if cache is None else (cache.k_LBSKH, cache.v_LBSKH)
        if cfg.scan_layers:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layers = scanned(cfg, name="layers")
            x_BTD, new_kv = layers(x_BTD, kv_all, angles_BTh, mask_BTS, write_index)
            return x_BTD, _write_cache(kv_all, new_kv, write_index)
        new_k, new_v = [], []
        for i in range(cfg.num_layers):
            kv = None if kv_all is None else (kv_all[0][i], kv_all[1][i])
            x_BTD, kv = block_cls(cfg, name=f"layers_{i}")(
                x_BTD, kv, angles_BTh, mask_BTS, write_index
            )
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        new_kv = None if kv_all is None else (jnp.stack(new_k), jnp.stack(new_v))
        return x_BTD, _write_cache(kv_all, new_kv, write_index)

    def _head(self, x_BTD, embedding_VD):
        cfg = self.config
        if cfg.is_classifier:
            kernel_DC = Weight(
                "kernel",
                (cfg.dim, cfg.num_labels),
                ("embed", None),
                cfg.param_dtype,
                name="score",
            )()
            scores = jnp.einsum("BTD,DC->BTC", x_BTD, kernel_DC.astype(cfg.dtype))
            return scores.astype(at_least_float32(cfg.dtype))
        if cfg.tie_embeddings:
            spec, matrix = "BTD,VD->BTV", embedding_VD
        else:
            spec = "BTD,DV->BTV"
            matrix = Weight(
                "kernel",
                (cfg.dim, cfg.vocab_size),
                ("embed", "vocab"),
                cfg.param_dtype,
                name="lm_head",
            )()
        logits = jnp.einsum(spec, x_BTD, matrix.astype(cfg.dtype))
        return logits.astype(at_least_float32(cfg.dtype))


class PrefixBlock(Block):
    """One layer applied, for each group, to its prefix rows and then to their
    continuation rows, which attend to the prefix's keys and values (repeated to their
    rows here, inside the layer) and causally to their own."""

    def __call__(self, xs, geometry):
        cfg = self.config
        out = []
        for (x_PTD, x_BAD), (angles_p, mask_p, angles_c, mask_c) in zip(xs, geometry):
            num_prefixes, prefix_len = x_PTD.shape[:2]
            group, num_slots = x_BAD.shape[0] // num_prefixes, mask_c.shape[-1]
            empty = jnp.zeros((num_prefixes, prefix_len, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
            x_PTD, kv_prefix = super().__call__(x_PTD, (empty, empty), angles_p, mask_p, 0)
            pad = ((0, 0), (0, num_slots - prefix_len), (0, 0), (0, 0))
            kv_rows = tuple(jnp.repeat(jnp.pad(a, pad), group, axis=0) for a in kv_prefix)
            x_BAD, _ = super().__call__(x_BAD, kv_rows, angles_c, mask_c, prefix_len)
            out.append((x_PTD, x_BAD))
        return tuple(out), None


class SharedPrefixLlama(Llama):
    """The Llama (same parameters) over groups of (P prefixes, B = P·k continuation rows,
    row b continuing prefix b // k) in ONE pass through the layers: the backward pass then
    builds one gradient, where a prefix pass and a cached continuation pass per group
    built one each (a full copy of the parameters' size per pass), and the prefix's keys
    and values are repeated to the rows one layer at a time, never for all layers.

    `apply(vars, groups)` with groups = ((prefix_PT, prefix_mask_PT, tokens_BA, mask_BA),
    ...) returns, per group, (prefix hidden_PTD, continuation hidden_BAD): final normed
    hidden states, equal to a cached prefix pass followed by a continuation pass.
    """

    @nn.compact
    def __call__(self, groups):
        cfg = self.config
        shape, axes = (cfg.vocab_size, cfg.dim), ("vocab", "embed")
        embedding_VD = Weight("embedding", shape, axes, cfg.param_dtype, name="embed")()
        embed = lambda t: constrain(jnp.take(embedding_VD, t, axis=0).astype(cfg.dtype), BTD)
        xs, geometry = [], []
        for prefix_PT, prefix_mask_PT, tokens_BA, mask_BA in groups:
            (num_prefixes, prefix_len), (batch, length) = prefix_PT.shape, tokens_BA.shape
            slots = jnp.zeros((num_prefixes, prefix_len + length), bool)
            empty = KVCache(None, None, slots, jnp.zeros((), jnp.int32))
            angles_p, mask_p, _, slots_PS = self._geometry(
                prefix_mask_PT.astype(bool), None, empty, prefix_len
            )
            slots_BS = jnp.repeat(slots_PS, batch // num_prefixes, axis=0)
            filled = KVCache(None, None, slots_BS, jnp.asarray(prefix_len, jnp.int32))
            angles_c, mask_c, _, _ = self._geometry(mask_BA.astype(bool), None, filled, None)
            xs.append((embed(prefix_PT), embed(tokens_BA)))
            geometry.append((angles_p, mask_p, angles_c, mask_c))
        xs, geometry = tuple(xs), tuple(geometry)
        block_cls = PrefixBlock
        if cfg.remat:
            block_cls = nn.remat(PrefixBlock, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            xs, _ = layers(xs, geometry)
        else:
            for i in range(cfg.num_layers):
                xs, _ = block_cls(cfg, name=f"layers_{i}")(xs, geometry)
        norm = RMSNorm(cfg.rms_eps, cfg.dtype, cfg.param_dtype, name="final_norm")
        return tuple((norm(x_PTD), norm(x_BAD)) for x_PTD, x_BAD in xs)
