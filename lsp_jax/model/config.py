"""LlamaConfig: the architecture of a Llama-family model, with presets."""

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lsp_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3") RoPE frequency scaling."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


# Projections a LoRA adapter can target (our parameter names; Hugging Face's q_proj, ...).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: a target kernel W [in, out] computes x W + (alpha/rank)(x A) B,
    A [in, rank] small random, B [rank, out] zero (so the adapted model starts equal to
    the base). rank 0: no adapters."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, name: str) -> bool:
        return self.rank > 0 and name in self.targets


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama model.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters.
    `num_labels` > 0 makes a sequence classifier (a reward model): the LM head is
    replaced by a `score` head with that many outputs.
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    max_position_embeddings: int = 131_072
    num_labels: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs whole groups."
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings.")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def is_classifier(self) -> bool:
        return self.num_labels > 0

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [H/2] in float32, with llama3 scaling if configured."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        if self.rope_scaling is not None:
            inv_freq = _llama3_scale(inv_freq, self.rope_scaling)
        return inv_freq.astype(np.float32)

    # Presets. Numbers from the models' published config.json files.
    @classmethod
    def llama3_2_1b(cls, **overrides) -> "LlamaConfig":
        return cls(
            **{
                **_LLAMA3_2_COMMON,
                "dim": 2048,
                "num_layers": 16,
                "num_heads": 32,
                "head_dim": 64,
                **overrides,
            }
        )

    @classmethod
    def llama3_2_3b(cls, **overrides) -> "LlamaConfig":
        return cls(
            **{
                **_LLAMA3_2_COMMON,
                "dim": 3072,
                "num_layers": 28,
                "num_heads": 24,
                "head_dim": 128,
                **overrides,
            }
        )

    @classmethod
    def smollm2_135m(cls, **overrides) -> "LlamaConfig":
        fields = dict(
            vocab_size=49152,
            dim=576,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            mlp_dim=1536,
            rope_theta=100_000.0,
            rms_eps=1e-5,
            tie_embeddings=True,
            max_position_embeddings=8192,
            bos_token_id=1,
            eos_token_ids=(2,),
            pad_token_id=2,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A small random model for tests: GQA, llama3 scaling with a short original context."""
        fields = dict(
            vocab_size=512,
            dim=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            mlp_dim=128,
            rope_theta=10_000.0,
            rope_scaling=RopeScaling(
                factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=32
            ),
            tie_embeddings=False,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_ids=(2,),
            pad_token_id=0,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> "LlamaConfig":
        """Builds a config from a Hugging Face `config.json` dict of a Llama model."""
        return cls(**{**_fields_from_hf(hf), **overrides})

    def to_hf_config(self) -> dict:
        """The Hugging Face `config.json` dict for this architecture."""
        return _fields_to_hf(self)


_LLAMA3_2_COMMON = dict(
    vocab_size=128256,
    num_kv_heads=8,
    mlp_dim=8192,
    rope_theta=500_000.0,
    rope_scaling=RopeScaling(),
    rms_eps=1e-5,
    tie_embeddings=True,
    max_position_embeddings=131_072,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
    pad_token_id=None,
)


def _llama3_scale(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama-3 frequency scaling: long wavelengths slowed by `factor`, short kept, a
    smooth blend between (the three bands of the Llama 3.1 report)."""
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(is_medium, blended, scaled)


_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification")


def _fields_from_hf(hf: dict) -> dict:
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or architectures[0] not in _SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"Unsupported model: model_type={hf.get('model_type')!r}, "
            f"architectures={architectures}. lsp_jax loads Llama models "
            f"({', '.join(_SUPPORTED_ARCHITECTURES)})."
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError("Llama checkpoints with attention or MLP biases are not supported.")
    num_heads = hf["num_attention_heads"]
    scaling = _rope_scaling_from_hf(hf)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    is_classifier = architectures[0] == "LlamaForSequenceClassification"
    return dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=_rope_theta_from_hf(hf),
        rope_scaling=scaling,
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        num_labels=_num_labels(hf) if is_classifier else 0,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
    )


def _rope_theta_from_hf(hf: dict) -> float:
    # transformers >= 5 writes rope_theta inside rope_parameters, older versions at top level.
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    return float(theta or 10_000.0)


def _num_labels(hf: dict) -> int:
    if "num_labels" in hf:
        return int(hf["num_labels"])
    return len(hf.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})


def _rope_scaling_from_hf(hf: dict) -> RopeScaling | None:
    # transformers >= 4.5x may store it under rope_parameters; older under rope_scaling.
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"RoPE scaling type {kind!r} is not supported (only 'llama3').")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]),
    )


def _fields_to_hf(config: LlamaConfig) -> dict:
    hf = {
        "architectures": [
            "LlamaForSequenceClassification" if config.is_classifier else "LlamaForCausalLM"
        ],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": jnp.dtype(config.param_dtype).name,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    if config.is_classifier:
        hf["num_labels"] = config.num_labels
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    for key, value in (
        ("bos_token_id", config.bos_token_id),
        ("pad_token_id", config.pad_token_id),
    ):
        if value is not None:
            hf[key] = value
    if config.eos_token_ids:
        eos = list(config.eos_token_ids)
        hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return hf
