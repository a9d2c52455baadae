"""`lsp-jax convert --model SRC --out DIR`: any model source as a Hugging Face folder.

Writes config.json, generation_config.json and safetensors weights (via save_hf), and
the tokenizer (lsp_jax.weights.export), so transformers' AutoTokenizer and
AutoModelForCausalLM load the folder.
"""

from pathlib import Path

from lsp_jax.weights import sources
from lsp_jax.weights.export import export_folder

_DTYPES = ("float32", "bfloat16", "float16")


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


def convert(model, out, *, dtype=None, overwrite=False) -> Path:
    """Writes the model source `model` as a Hugging Face folder `out`; returns its path."""
    from lsp_jax.weights.hf import check_new_folder

    if not overwrite:
        check_new_folder(out, hint="choose another --out or pass --overwrite")
    config, params = sources.load_model(model)
    return export_folder(model, out, config, params, dtype=dtype, overwrite=overwrite)


def run(args) -> int:
    folder = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"Wrote {folder} (Hugging Face format) from {args.model}.")
    return 0
