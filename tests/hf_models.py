"""Tiny random Hugging Face Llama models for parity tests (torch/transformers: tests only).

Import inside a test or fixture: importing this module imports torch and transformers.
"""

import numpy as np
import torch
import transformers

# Llama-3 RoPE scaling with a short original context, so that with rope_theta 1e4 and
# head_dim 16 the wavelengths (6.3, 19.9, 62.8, ...) fall in all three bands:
# high frequency (< 32/4 = 8), blended (8..32) and low frequency (> 32).
TINY_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_hf_config(**overrides) -> "transformers.LlamaConfig":
    """A 2-layer GQA Llama config (4 query heads, 2 kv heads) with llama3 RoPE scaling."""
    fields = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10_000.0,
        rope_scaling=dict(TINY_ROPE_SCALING),
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attn_implementation="eager",
    )
    return transformers.LlamaConfig(**{**fields, **overrides})


def randomize(model: "torch.nn.Module", seed: int) -> "torch.nn.Module":
    """Re-draws every weight at a scale that keeps activations O(1).

    transformers' default init (std 0.02, unit norms) gives near-zero logits, which
    would let a wrong layout pass a 1e-4 parity check.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model.eval()


def causal_lm(seed: int = 0, **overrides) -> "transformers.LlamaForCausalLM":
    return randomize(transformers.LlamaForCausalLM(tiny_hf_config(**overrides)), seed)


def classifier(seed: int = 0, **overrides) -> "transformers.LlamaForSequenceClassification":
    fields = {"num_labels": 1, "pad_token_id": 0, **overrides}  # Overrides win.
    model = transformers.LlamaForSequenceClassification(tiny_hf_config(**fields))
    return randomize(model, seed)


def hf_positions(mask_BT: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens (pads 0), as lsp_jax counts them."""
    return np.maximum(np.cumsum(mask_BT, axis=-1) - 1, 0)


def hf_forward(model, tokens_BT: np.ndarray, mask_BT: np.ndarray | None = None) -> np.ndarray:
    """float32 numpy logits of a transformers model (LM: [B, T, V]; classifier: [B, C])."""
    if mask_BT is None:
        mask_BT = np.ones(tokens_BT.shape, bool)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens_BT), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(mask_BT), dtype=torch.long),
            position_ids=torch.as_tensor(hf_positions(np.asarray(mask_BT)), dtype=torch.long),
        )
    return out.logits.float().numpy()


def load_transformers(folder, cls=None):
    """A saved folder loaded back by transformers (float32, eager attention)."""
    cls = cls or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
