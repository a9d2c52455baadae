"""Hugging Face Llama checkpoints (config.json + safetensors, sharded or not) in and out."""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
from safetensors import SafetensorError, safe_open

from lsp_jax.errors import UserError
from lsp_jax.model.config import LlamaConfig
from lsp_jax.weights.layout import HfExport, hf_exports, params_from_hf_state

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
_FILE_MODE = 0o644

# Loading.


class _SafetensorsFolder(Mapping):
    """Tensors of a folder's safetensors files, read from disk on access."""

    def __init__(self, file_of: dict[str, Path], stack: contextlib.ExitStack):
        self._file_of = file_of
        self._stack = stack
        self._handles = {}

    def _handle(self, name: str):
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(_safe_open(file))
        return self._handles[file]

    def __getitem__(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the file header (no tensor bytes are read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only the bytes of `tensor[index]` (contiguous slices), in the stored dtype."""
        return self._handle(name).get_slice(name)[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, name) -> bool:
        return name in self._file_of


def _safe_open(path: Path):
    """safe_open(path), with a damaged file (truncated, not safetensors) named in a
    UserError instead of safetensors' low-level error."""
    try:
        return safe_open(path, framework="np")
    except (SafetensorError, OSError) as error:
        raise UserError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated by an "
            "interrupted download or copy. Fetch or copy it again."
        ) from None


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index or the files' own headers."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise UserError(f"Shard {file} listed in {index} is missing.")
        return files
    paths = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else []
    paths = paths or sorted(folder.glob("*.safetensors"))
    if not paths:
        other = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" Found PyTorch files {other[:3]}: re-save them as safetensors." if other else ""
        raise UserError(
            f"No safetensors weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} "
            f"with its shards.{hint}"
        )
    files = {}
    for path in paths:
        with _safe_open(path) as handle:
            files.update({name: path for name in handle.keys()})  # noqa: SIM118
    return files


@contextlib.contextmanager
def open_safetensors(folder) -> Iterator[Mapping[str, np.ndarray]]:
    """A lazy name -> numpy array mapping over a folder's safetensors files."""
    files = _safetensors_files(Path(folder))
    with contextlib.ExitStack() as stack:
        yield _SafetensorsFolder(files, stack)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}).") from None


def _hf_folder(path) -> Path:
    folder = Path(path).expanduser()
    if folder.is_file() and (folder.suffix == ".safetensors" or folder.name == "config.json"):
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(
            f"Model folder {folder} does not exist: expected a Hugging Face folder with "
            f"config.json and {SINGLE_FILE} (or {INDEX_FILE} and its shards)."
        )
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{folder} has no config.json: expected a Hugging Face model folder "
            f"(config.json plus safetensors weights)."
        )
    return folder


def _stop_tokens(folder: Path, config: LlamaConfig) -> dict:
    """Stop and pad tokens from generation_config.json merged into the model config's:
    instruct models list their end-of-turn tokens only there."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    generation = _read_json(path)
    eos = generation.get("eos_token_id")
    eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
    eos_ids = tuple(dict.fromkeys([*config.eos_token_ids, *eos]))
    pad = config.pad_token_id
    if pad is None:
        pad = generation.get("pad_token_id")
    return dict(eos_token_ids=eos_ids, pad_token_id=pad)


def load_hf_config(path, *, dtype=None, param_dtype=None, scan_layers: bool = False):
    """The LlamaConfig of a Hugging Face folder (config.json and generation_config.json;
    no weights are read). Options as for `load_hf`."""
    folder = _hf_folder(path)
    overrides = {"scan_layers": scan_layers}
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    config = LlamaConfig.from_hf_config(_read_json(folder / "config.json"), **overrides)
    return config.replace(**_stop_tokens(folder, config))


def load_hf(
    path, *, dtype=None, param_dtype=None, scan_layers: bool = False, shardings=None
) -> tuple[LlamaConfig, dict]:
    """Loads a Hugging Face Llama folder (LlamaForCausalLM or
    LlamaForSequenceClassification; single-file or sharded safetensors).

    Args:
      path: the folder (or its config.json / a .safetensors file in it).
      dtype: compute dtype of the returned config (default float32).
      param_dtype: storage dtype of the parameters (default float32, whatever the
        checkpoint stores; pass jnp.bfloat16 to halve memory).
      scan_layers: return the scanned layout (one 'layers' tree with a leading L axis).
      shardings: None, or a pytree of jax.sharding.Sharding shaped like the params (or a
        function config -> that pytree). Then every leaf is a global jax.Array and this
        host reads only the slices of the safetensors its addressable devices hold
        (lsp_jax/weights/sharded.py).

    Returns:
      (config, params): params is a nested dict of host numpy arrays (or jax.Arrays,
      with `shardings`) for `Llama(config).apply({'params': params}, tokens_BT)`.
    """
    config = load_hf_config(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    folder = _hf_folder(path)
    with open_safetensors(folder) as tensors:
        if shardings is None:
            params = params_from_hf_state(config, tensors, source=str(folder))
        else:
            from lsp_jax.weights.sharded import params_from_slices

            params = params_from_slices(config, tensors, shardings, source=str(folder))
    return config, params


# Saving.


def _plan_shards(exports: list[HfExport], max_shard_bytes: int) -> list[list[HfExport]]:
    """Consecutive groups of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for export in exports:
        if shards[-1] and size + export.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(export)
        size += export.nbytes
    return shards


def _write_weights(folder: Path, exports: list[HfExport], max_shard_bytes: int) -> None:
    shards = _plan_shards(exports, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else []
    names = names or [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    for file, shard in zip(names, shards):
        _write_safetensors(folder / file, shard)
        os.chmod(folder / file, _FILE_MODE)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in exports)},
            "weight_map": {e.name: file for file, shard in zip(names, shards) for e in shard},
        }
        _write_json(folder / INDEX_FILE, index)


# safetensors' names of the dtypes an export can hold.
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(path: Path, exports: list[HfExport]) -> None:
    """Writes one safetensors file, a tensor at a time: an 8-byte little-endian header
    length, the JSON header (name -> dtype, shape, byte offsets), then the tensors'
    bytes in header order. safetensors' own `save_file` serializes the whole file in
    memory first: for the CPU default's export that doubled its weights' 0.54 GB at the
    end of the run, the run's resident-memory peak."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in exports:
        header[e.name] = {
            "dtype": _SAFETENSORS_DTYPES[np.dtype(e.dtype).name],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # Tensors start 8-byte aligned, as safetensors writes.
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for e in exports:
            array = np.ascontiguousarray(e.array(), dtype=e.dtype)
            assert array.shape == tuple(e.shape), (e.name, array.shape, e.shape)
            f.write(array.reshape(-1).view(np.uint8))  # Little-endian hosts (x86, ARM).


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _generation_config(config: LlamaConfig) -> dict:
    generation = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}
    eos = list(config.eos_token_ids)
    generation["eos_token_id"] = (eos[0] if len(eos) == 1 else eos) if eos else None
    return {key: value for key, value in generation.items() if value is not None}


def check_new_folder(path, *, hint: str) -> None:
    """Raises UserError unless `path` is free to be written: absent, or an empty folder
    (e.g. made by `mkdir` beforehand). A file or a non-empty folder is never replaced
    without an explicit overwrite."""
    path = Path(path).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a folder; {hint}.")
    if any(path.iterdir()):
        raise UserError(f"{path} already exists and is not empty; {hint}.")


def _replace_folder(new: Path, final: Path) -> None:
    """Puts `new` at `final` by renames: the final name never holds a partial folder."""
    if not final.exists():
        os.rename(new, final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old)


def save_hf(
    path,
    config: LlamaConfig,
    params,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype=None,
    overwrite: bool = False,
    extra_files: Iterable = (),
) -> Path:
    """Writes a Hugging Face folder that transformers' `from_pretrained` loads.

    Writes config.json, generation_config.json (bos/eos/pad) and model.safetensors, or
    numbered shards plus model.safetensors.index.json when the weights exceed
    `max_shard_bytes`. Everything is written into a hidden sibling folder first and
    renamed into place, so an interrupted export never leaves a partial folder at `path`.

    Args:
      path: the folder to create.
      config: the architecture of `params`.
      params: scanned or unscanned `Llama(config)` parameters (boxed or not), fully
        addressable (gather sharded multi-host arrays first).
      max_shard_bytes: largest shard size in bytes.
      dtype: dtype to store (default: the parameters' own).
      overwrite: replace an existing folder at `path` (else only a new or empty folder
        is written, and anything else raises UserError).
      extra_files: files copied into the folder (tokenizer.json, ...).

    Returns:
      The folder path.
    """
    final = Path(path).expanduser()
    if not overwrite:
        check_new_folder(final, hint="choose a new folder or pass overwrite=True")
    exports = hf_exports(config, params, dtype)
    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = exports[0].dtype.name
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:
        _write_weights(partial, exports, max_shard_bytes)
        _write_json(partial / "config.json", hf_config)
        _write_json(partial / "generation_config.json", _generation_config(config))
        for file in extra_files:
            shutil.copy2(file, partial / Path(file).name)
        _replace_folder(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
