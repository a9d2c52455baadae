"""The Llama config a GGUF file's metadata describes: sizes, stop ids, llama3 RoPE scaling.

The functions take a parsed file (`lsp_jax.weights.gguf.read_gguf`) without importing its
class, so the reader can build a config through them.
"""

import math
from collections.abc import Mapping

import numpy as np

from lsp_jax.errors import UserError
from lsp_jax.model.config import LlamaConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama",)


def config_from_gguf(file, **overrides) -> LlamaConfig:
    """The LlamaConfig a llama-architecture GGUF file describes.

    Args:
      file: the parsed file, a `lsp_jax.weights.gguf.GGUFFile` (its metadata and tensor
        directory; only the rope_freqs tensor is read).
      **overrides: LlamaConfig fields that replace the file's.
    """
    meta, arch = file.metadata, file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{file.path} holds a {arch!r} model; lsp_jax loads GGUF files of the "
            f"architectures {', '.join(SUPPORTED_ARCHITECTURES)} only."
        )

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{file.path} lacks the metadata key {arch}.{key}; it is not usable.")
        return value

    dim, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // num_heads))
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UserError(f"{file.path}: partial rotary embeddings are not supported.")
    tokenizer = tokenizer_ids(meta)
    fields = dict(
        vocab_size=_vocab_size(file),
        dim=dim,
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        mlp_dim=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in file.tensors,
        max_position_embeddings=int(get("context_length", 2048)),
        **tokenizer,
    )
    config = LlamaConfig(**fields)
    config = config.replace(rope_scaling=_rope_scaling(file, config), **overrides)
    return config


def _vocab_size(file) -> int:
    tokens = file.metadata.get("tokenizer.ggml.tokens")
    embed = file.tensors.get("token_embd.weight")
    if embed is None:
        raise UserError(f"{file.path} has no token_embd.weight tensor; it is not a Llama model.")
    rows = embed.shape[0]
    if tokens is not None and len(tokens) != rows:
        raise UserError(
            f"{file.path}: the tokenizer lists {len(tokens)} tokens but the embedding has "
            f"{rows} rows; the file is inconsistent."
        )
    return rows


def tokenizer_ids(meta: Mapping) -> dict:
    """bos, stop (eos, eot, eom) and pad ids from the tokenizer metadata."""
    bos = meta.get("tokenizer.ggml.bos_token_id")
    stops = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and value not in stops:
            stops.append(int(value))
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is None and stops:
        pad = stops[0]
    return dict(
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(stops),
        pad_token_id=None if pad is None else int(pad),
    )


def _rope_scaling(file, config: LlamaConfig) -> RopeScaling | None:
    """Llama-3 scaling, which llama.cpp stores as per-frequency divisors (rope_freqs)."""
    kind = file.metadata.get(f"{file.architecture}.rope.scaling.type", "none")
    if kind not in ("none", "llama3"):
        raise UserError(f"{file.path}: RoPE scaling {kind!r} is not supported (only llama3).")
    if "rope_freqs.weight" not in file.tensors:
        return None
    divisors = file.read_tensor("rope_freqs.weight").astype(np.float64)
    return llama3_scaling_from_divisors(divisors, config, path=file.path)


def llama3_scaling_from_divisors(divisors, config: LlamaConfig, *, path="") -> RopeScaling | None:
    """Recovers RopeScaling from llama.cpp's rope_freqs divisors [H/2].

    Only three numbers are identifiable: the factor (the largest divisor) and the band
    edges orig/low and orig/high, so low_freq_factor is fixed to 1. In the blended band
    1/divisor = (1 - s)/factor + s with s linear in the inverse wavelength; two or more
    blended frequencies give the edges by a line fit, fewer are resolved by trying
    power-of-two original contexts. Every candidate is checked by recomputing the
    frequencies.
    """
    divisors = np.asarray(divisors, np.float64)
    if np.allclose(divisors, 1.0):
        return None
    base = config.replace(rope_scaling=None).rope_inv_freq().astype(np.float64)
    factor = float(divisors.max())
    candidates = []
    inverse_wavelength = base / (2 * math.pi)
    blended = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if blended.sum() >= 2:
        smooth = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inverse_wavelength[blended], smooth, 1)
        original = -slope / intercept
        candidates.append((original, original * (1 - intercept) / slope))
    candidates += [(2.0**k, high) for k in range(1, 25) for high in (2.0, 4.0, 8.0, 16.0)]
    target = base / divisors
    for original, high in candidates:
        scaling = RopeScaling(
            factor=factor,
            low_freq_factor=1.0,
            high_freq_factor=float(round(high, 4)),
            original_max_position=int(round(original)),
        )
        recomputed = config.replace(rope_scaling=scaling).rope_inv_freq()
        if np.allclose(recomputed, target, rtol=1e-4):
            return scaling
    raise UserError(
        f"{path}: rope_freqs does not match Llama-3 RoPE scaling; this model's RoPE "
        f"variant is not supported."
    )
