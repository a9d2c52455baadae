"""`lsp-jax convert --model SRC --out DIR`: any model source as a Hugging Face folder.

Writes config.json, generation_config.json and safetensors weights (via save_hf), and
the tokenizer: a Hugging Face source's tokenizer files are copied; a GGUF source's
embedded tokenizer is written as tokenizer.json + tokenizer_config.json (with its chat
template and special tokens), so transformers' AutoTokenizer and
AutoModelForCausalLM load the folder.
"""

import tempfile
from pathlib import Path

from lsp_jax.weights import sources

_DTYPES = ("float32", "bfloat16", "float16")
# Tokenizer files of a Hugging Face folder, copied as they are.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def add_arguments(parser):
    parser.add_argument(
        "--model",
        required=True,
        help="Model source: Hugging Face folder, .gguf file, run checkpoint, or a named "
        f"model ({', '.join(sources.NAMED_MODELS)}).",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="Folder to write (new or empty; a non-empty one needs --overwrite).",
    )
    parser.add_argument(
        "--dtype",
        choices=_DTYPES,
        default=None,
        help="Storage dtype of the written weights (default: float32, or the source's).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")


def _storage_dtype(name):
    import jax.numpy as jnp

    return None if name is None else jnp.dtype(name)


def convert(model, out, *, dtype=None, overwrite=False) -> Path:
    """Writes the model source `model` as a Hugging Face folder `out`; returns its path."""
    from lsp_jax.weights.hf import check_new_folder

    if not overwrite:
        check_new_folder(out, hint="choose another --out or pass --overwrite")
    config, params = sources.load_model(model)
    return export_folder(model, out, config, params, dtype=dtype, overwrite=overwrite)


def export_folder(source, out, config, params, *, dtype=None, overwrite=True) -> Path:
    """Writes `params` as a Hugging Face folder with the tokenizer files of `source`
    (the model they were trained from); used by `convert` and by the trainer."""
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
    from lsp_jax.weights.tokenizer import save_hf_tokenizer_files

    if source.kind == sources.HF:
        return [source.path / n for n in _HF_TOKENIZER_FILES if (source.path / n).is_file()]
    if source.kind == sources.ORBAX:
        from lsp_jax.weights.runs import run_model_source

        return _tokenizer_files(sources.resolve(run_model_source(source.path)), scratch, config)
    tokenizer = sources.load_tokenizer(source)
    return save_hf_tokenizer_files(
        tokenizer, scratch, model_max_length=config.max_position_embeddings
    )


def run(args) -> int:
    folder = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"Wrote {folder} (Hugging Face format) from {args.model}.")
    return 0
