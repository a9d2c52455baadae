"""Trained parameters as a Hugging Face folder with the tokenizer of their model source,
so that transformers' AutoTokenizer and AutoModelForCausalLM load it: used by
`lsp-jax convert` and by the trainer's exports."""

import tempfile
from pathlib import Path

from lsp_jax.weights import sources

# Tokenizer files of a Hugging Face folder, copied as they are.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def _storage_dtype(name):
    import jax.numpy as jnp

    return None if name is None else jnp.dtype(name)


def export_folder(source, out, config, params, *, dtype=None, overwrite=True) -> Path:
    """Writes `params` as a Hugging Face folder with the tokenizer files of `source`
    (the model they were trained from). A Hugging Face source's tokenizer files are
    copied; a GGUF source's embedded tokenizer is written as tokenizer.json +
    tokenizer_config.json (with its chat template and special tokens)."""
    from lsp_jax.weights.hf import save_hf

    with tempfile.TemporaryDirectory() as scratch:
        files = _tokenizer_files(sources.resolve(source), scratch, config)
        return save_hf(
            out,
            config,
            params,
            dtype=_storage_dtype(dtype),
            overwrite=overwrite,
            extra_files=files,
        )


def _tokenizer_files(source, scratch, config) -> list:
    from lsp_jax.weights.tokenizer_files import save_hf_tokenizer_files

    if source.kind == sources.HF:
        return [source.path / n for n in _HF_TOKENIZER_FILES if (source.path / n).is_file()]
    if source.kind == sources.ORBAX:
        from lsp_jax.weights.runs import run_model_source

        return _tokenizer_files(sources.resolve(run_model_source(source.path)), scratch, config)
    tokenizer = sources.load_tokenizer(source)
    return save_hf_tokenizer_files(
        tokenizer, scratch, model_max_length=config.max_position_embeddings
    )
