"""LoRA adapters in PEFT's layout: adapter_config.json + adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(base_model, folder)` loads on top of the base."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lsp_jax.model import LlamaConfig
from lsp_jax.model.lora import A_SUFFIX, B_SUFFIX
from lsp_jax.weights.layout import unstack_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Our kernel names -> the Hugging Face Llama module each adapts.
MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def peft_tensors(config: LlamaConfig, adapters) -> dict[str, np.ndarray]:
    """PEFT's tensors of our adapters: `base_model.model.model.layers.{i}.{module}
    .lora_A.weight` [R, in] and `.lora_B.weight` [out, R] (torch Linear layout, head axes
    flattened as Hugging Face's q_proj/o_proj weights flatten them)."""
    rank, layers = config.lora.rank, unstack_layers(adapters)
    out = {}
    for i in range(config.num_layers):
        for block in layers[f"layers_{i}"].values():
            for key, a in block.items():
                if not key.endswith(A_SUFFIX):
                    continue
                name = key.removesuffix(A_SUFFIX)
                b = np.asarray(block[name + B_SUFFIX])
                prefix = f"base_model.model.model.layers.{i}.{MODULES[name]}"
                out[prefix + ".lora_A.weight"] = np.asarray(a).reshape(-1, rank).T
                out[prefix + ".lora_B.weight"] = b.reshape(rank, -1).T
    return out


def peft_config(config: LlamaConfig, *, base: str = "") -> dict:
    """adapter_config.json: a plain LoRA (scale alpha/r, no dropout, no bias)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "target_modules": sorted(MODULES[t].split(".")[-1] for t in config.lora.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_peft_adapter(path, config: LlamaConfig, adapters, *, base: str = "", dtype=None) -> Path:
    """Writes the adapters of `config` (host arrays, scanned or not) as a PEFT folder.

    Args:
      path: the folder to create (or fill).
      config: the adapted architecture (config.lora.rank > 0).
      adapters: the adapter leaves only (lsp_jax.model.lora.split(params)[1]).
      base: the base model's name or path, recorded as base_model_name_or_path.
      dtype: storage dtype (default: the adapters' own).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(config, adapters)
    if dtype is not None:
        import jax.numpy as jnp  # Knows "bfloat16" by name.

        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config_text = json.dumps(peft_config(config, base=base), indent=2)
    (folder / CONFIG_FILE).write_text(config_text + "\n")
    return folder
