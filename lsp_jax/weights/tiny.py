"""Seeded random tiny models (`tiny-random`, `tiny-random-rm`) for tests and smoke runs.

Each is written once, deterministically, as an ordinary Hugging Face folder (weights,
config, a byte-level tokenizer with ChatML special tokens and a chat template) under
$LSP_JAX_CACHE (default ~/.cache/lsp_jax), so every code path that loads real models
loads these too. Nothing is downloaded.
"""

import json
import os
import tempfile
from pathlib import Path

TINY_MODELS = {"tiny-random": 0, "tiny-random-rm": 1}  # name -> seed
_VERSION = "1"  # Bump when the recipe changes, so stale caches are rebuilt.
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("LSP_JAX_CACHE", Path.home() / ".cache" / "lsp_jax"))


def tiny_model_path(name: str) -> Path:
    """The folder of a tiny model, written on first use."""
    folder = cache_root() / f"{name}-v{_VERSION}"
    if not (folder / "tokenizer.json").is_file():
        _write(name, folder)
    return folder


def _tokenizer():
    """Byte-level BPE without merges: 256 byte tokens, then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_to_unicode))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(_SPECIALS))
    return tokenizer


def _write(name: str, folder: Path) -> None:
    import jax
    import jax.numpy as jnp
    from flax.linen import meta

    from lsp_jax.model import Llama, LlamaConfig
    from lsp_jax.weights.hf import save_hf

    tokenizer = _tokenizer()
    ids = {t: tokenizer.token_to_id(t) for t in _SPECIALS}
    is_rm = name.endswith("-rm")
    config = LlamaConfig.tiny(
        num_labels=1 if is_rm else 0,
        bos_token_id=None,
        eos_token_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]),
        pad_token_id=ids["<|endoftext|>"],
    )
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = meta.unbox(Llama(config).init(jax.random.key(TINY_MODELS[name]), tokens)["params"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    save_hf(staging / "model", config, params, overwrite=True)
    tokenizer.save(str(staging / "model" / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "add_bos_token": False,
        "chat_template": _CHAT_TEMPLATE,
    }
    (staging / "model" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    try:
        os.replace(staging / "model", folder)  # Atomic: a racing writer loses harmlessly.
    except OSError:
        pass
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
