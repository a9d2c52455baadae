"""Hugging Face Llama checkpoints (config.json + safetensors, sharded or not) in and out."""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
from flax.linen import meta
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lsp_jax.errors import UserError
from lsp_jax.model.config import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
_FILE_MODE = 0o644
# Tensors some checkpoints carry that hold nothing the model needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """How one parameter leaf maps to one Hugging Face tensor.

    Hugging Face stores a Linear weight as [out, in]; our kernels put the input axes
    first and split head axes out (q: [D, N, H] from [N*H, D]), so a `linear` tensor
    is transposed and reshaped, anything else only reshaped.
    """

    path: tuple[str, ...]  # Keys inside one layer's tree (or the top-level tree).
    hf_name: str  # '{i}' stands for the layer index.
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    linear: bool

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        """Our layout of a Hugging Face tensor (a view where numpy allows)."""
        return (tensor.T if self.linear else tensor).reshape(self.shape)

    def to_hf(self, leaf: np.ndarray) -> np.ndarray:
        """The Hugging Face layout of one of our leaves (a view where numpy allows)."""
        if self.linear:
            return leaf.reshape(self.hf_shape[1], self.hf_shape[0]).T
        return leaf.reshape(self.hf_shape)


def _layer_tensors(config: LlamaConfig) -> tuple[_Tensor, ...]:
    d, n, k, h, f = (
        config.dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
    )
    prefix = "model.layers.{i}."
    return (
        _Tensor(("attn_norm", "scale"), prefix + "input_layernorm.weight", (d,), (d,), False),
        _Tensor(("attn", "q"), prefix + "self_attn.q_proj.weight", (d, n, h), (n * h, d), True),
        _Tensor(("attn", "k"), prefix + "self_attn.k_proj.weight", (d, k, h), (k * h, d), True),
        _Tensor(("attn", "v"), prefix + "self_attn.v_proj.weight", (d, k, h), (k * h, d), True),
        _Tensor(("attn", "o"), prefix + "self_attn.o_proj.weight", (n, h, d), (d, n * h), True),
        _Tensor(
            ("mlp_norm", "scale"), prefix + "post_attention_layernorm.weight", (d,), (d,), False
        ),
        _Tensor(("mlp", "gate"), prefix + "mlp.gate_proj.weight", (d, f), (f, d), True),
        _Tensor(("mlp", "up"), prefix + "mlp.up_proj.weight", (d, f), (f, d), True),
        _Tensor(("mlp", "down"), prefix + "mlp.down_proj.weight", (f, d), (d, f), True),
    )


def _head_tensors(config: LlamaConfig) -> tuple[tuple[_Tensor, ...], tuple[_Tensor, ...]]:
    """Tensors before the layers (embedding) and after them (norm, LM or score head)."""
    d, v = config.dim, config.vocab_size
    before = (_Tensor(("embed", "embedding"), "model.embed_tokens.weight", (v, d), (v, d), False),)
    after = [_Tensor(("final_norm", "scale"), "model.norm.weight", (d,), (d,), False)]
    if config.is_classifier:
        c = config.num_labels
        after.append(_Tensor(("score", "kernel"), "score.weight", (d, c), (c, d), True))
    elif not config.tie_embeddings:
        after.append(_Tensor(("lm_head", "kernel"), "lm_head.weight", (d, v), (v, d), True))
    return before, tuple(after)


def _expected_names(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every Hugging Face tensor, in the order transformers writes them."""
    before, after = _head_tensors(config)
    layer = _layer_tensors(config)
    names = [(t.hf_name, t.hf_shape) for t in before]
    for i in range(config.num_layers):
        names += [(t.hf_name.format(i=i), t.hf_shape) for t in layer]
    return names + [(t.hf_name, t.hf_shape) for t in after]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def check_names(config: LlamaConfig, tensors: Iterable[str], source: str) -> None:
    """Fails on the first missing tensor, or on tensors this architecture has no place for."""
    expected = _expected_names(config)
    available = set(tensors)  # Not `in tensors`: a Mapping's default __contains__ reads.
    for name, shape in expected:
        if name not in available:
            raise UserError(
                f"Tensor {name!r} in {source}: expected shape {shape}, found missing. Check "
                f"that the model config matches the weights (layers, head, "
                f"tie_word_embeddings) and that no shard of a sharded checkpoint is missing."
            )
    known = {name for name, _ in expected}
    if config.tie_embeddings and not config.is_classifier:
        known.add("lm_head.weight")  # Some exports keep a copy of the tied head; unused.
    unexpected = [n for n in available if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise UserError(
            f"{source} has {len(unexpected)} tensors a {_architecture(config)} with this "
            f"config does not have, e.g. {sorted(unexpected)[:3]}. lsp_jax loads Llama "
            f"models without biases; check the config (num_hidden_layers, architectures)."
        )


def _architecture(config: LlamaConfig) -> str:
    return "LlamaForSequenceClassification" if config.is_classifier else "LlamaForCausalLM"


def check_tensor_shape(name: str, found, spec: _Tensor, source: str) -> None:
    """Raises UserError when a checkpoint tensor's shape is not the one the config implies."""
    if tuple(found) != spec.hf_shape:
        raise UserError(
            f"Tensor {name!r} in {source}: expected shape {spec.hf_shape} (from the model "
            f"config), found {tuple(found)}. The config does not match these weights."
        )


def _read(spec: _Tensor, tensors: Mapping, layer: int | None, source: str) -> np.ndarray:
    """One tensor in our layout (a view of the loaded array), with its shape checked."""
    name = spec.hf_name.format(i=layer)
    tensor = np.asarray(tensors[name])
    check_tensor_shape(name, tensor.shape, spec, source)
    return spec.from_hf(tensor)


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Where one parameter leaf comes from: Hugging Face tensors in the layout `spec`
    describes; one tensor, or one per layer stacked on a leading L axis (`stacked`)."""

    spec: _Tensor
    hf_names: tuple[str, ...]
    stacked: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.hf_names), *self.spec.shape) if self.stacked else self.spec.shape


def param_sources(config: LlamaConfig, *, scan_layers: bool) -> dict:
    """The params tree of `Llama(config)` (scanned or not) with a ParamSource per leaf."""
    before, after = _head_tensors(config)
    tree = {}
    for spec in (*before, *after):
        _set(tree, spec.path, ParamSource(spec, (spec.hf_name,), stacked=False))
    layers = range(config.num_layers)
    for spec in _layer_tensors(config):
        if scan_layers:
            names = tuple(spec.hf_name.format(i=i) for i in layers)
            _set(tree, ("layers", *spec.path), ParamSource(spec, names, stacked=True))
        else:
            for i in layers:
                source = ParamSource(spec, (spec.hf_name.format(i=i),), stacked=False)
                _set(tree, (f"layers_{i}", *spec.path), source)
    return tree


def params_from_hf_state(
    config: LlamaConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    scan_layers: bool | None = None,
    dtype=None,
    source: str = "the checkpoint",
) -> dict:
    """Parameters of `Llama(config)` from Hugging Face-named tensors.

    Tensors are read one at a time (`tensors` may be a lazy mapping) and each is
    converted with at most one copy, so peak memory is the result plus one tensor.
    Leaves may share memory with the given arrays when no conversion is needed.

    Args:
      config: the architecture; says which tensors to expect and their shapes.
      tensors: Hugging Face name -> array ([out, in] Linear weights).
      scan_layers: build the scanned layout ('layers' with a leading L axis);
        defaults to `config.scan_layers`.
      dtype: storage dtype of the result (default `config.param_dtype`).
      source: how error messages name the checkpoint.

    Returns:
      A nested dict of host numpy arrays (no boxes); `jax.device_put` places them.

    Raises:
      UserError: a tensor is missing, unexpected, or of the wrong shape.
    """
    scan_layers = config.scan_layers if scan_layers is None else scan_layers
    dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    check_names(config, tensors, source)
    before, after = _head_tensors(config)
    params = {}
    for spec in before:
        _set(params, spec.path, np.ascontiguousarray(_read(spec, tensors, None, source), dtype))
    if scan_layers:
        layers = {}
        for spec in _layer_tensors(config):
            stacked = np.empty((config.num_layers, *spec.shape), dtype)
            for i in range(config.num_layers):
                stacked[i] = _read(spec, tensors, i, source)  # Casts while copying.
            _set(layers, spec.path, stacked)
        params["layers"] = layers
    else:
        for i in range(config.num_layers):
            layer = {}
            for spec in _layer_tensors(config):
                _set(layer, spec.path, np.ascontiguousarray(_read(spec, tensors, i, source), dtype))
            params[f"layers_{i}"] = layer
    for spec in after:
        _set(params, spec.path, np.ascontiguousarray(_read(spec, tensors, None, source), dtype))
    return params


@dataclasses.dataclass(frozen=True)
class _Export:
    """One Hugging Face tensor to write, computed only when asked for."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    array: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _plain_params(params) -> dict:
    params = meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    return params


def _leaf(params: dict, path: tuple[str, ...], shape: tuple[int, ...], where: str):
    try:
        leaf = _get(params, path)
    except (KeyError, TypeError):
        raise UserError(
            f"Parameter {where} is missing; the parameters do not match the config "
            f"(or mix the scanned 'layers' and unscanned 'layers_i' layouts)."
        ) from None
    if tuple(leaf.shape) != shape:
        raise UserError(
            f"Parameter {where} has shape {tuple(leaf.shape)} but the config expects {shape}."
        )
    return leaf


def _exports(config: LlamaConfig, params, dtype=None) -> list[_Export]:
    """Every tensor of the Hugging Face checkpoint, in transformers' order, unmaterialized."""
    params = _plain_params(params)
    scanned = "layers" in params
    before, after = _head_tensors(config)
    out = []

    def add(spec: _Tensor, name: str, get: Callable[[], np.ndarray], leaf_dtype) -> None:
        out_dtype = np.dtype(leaf_dtype if dtype is None else dtype)
        out.append(_Export(name, spec.hf_shape, out_dtype, lambda: spec.to_hf(np.asarray(get()))))

    for spec in before:
        leaf = _leaf(params, spec.path, spec.shape, "/".join(spec.path))
        add(spec, spec.hf_name, lambda leaf=leaf: leaf, leaf.dtype)
    for i in range(config.num_layers):
        for spec in _layer_tensors(config):
            name = spec.hf_name.format(i=i)
            if scanned:
                where = "/".join(("layers", *spec.path))
                leaf = _leaf(params["layers"], spec.path, (config.num_layers, *spec.shape), where)
                get = lambda leaf=leaf, i=i: leaf[i]
            else:
                where = "/".join((f"layers_{i}", *spec.path))
                leaf = _leaf(params.get(f"layers_{i}", {}), spec.path, spec.shape, where)
                get = lambda leaf=leaf: leaf
            add(spec, name, get, leaf.dtype)
    for spec in after:
        leaf = _leaf(params, spec.path, spec.shape, "/".join(spec.path))
        add(spec, spec.hf_name, lambda leaf=leaf: leaf, leaf.dtype)
    return out


def hf_state_from_params(config: LlamaConfig, params) -> dict[str, np.ndarray]:
    """Hugging Face-named host arrays ([out, in] Linear weights) of `Llama(config)`
    parameters, scanned or unscanned, boxed or not. Tied models have no lm_head.weight.

    Arrays may be non-contiguous views of host parameters; device arrays are copied to
    the host one at a time.
    """
    return {e.name: e.array() for e in _exports(config, params)}


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


def _plan_shards(exports: list[_Export], max_shard_bytes: int) -> list[list[_Export]]:
    """Consecutive groups of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for export in exports:
        if shards[-1] and size + export.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(export)
        size += export.nbytes
    return shards


def _write_weights(folder: Path, exports: list[_Export], max_shard_bytes: int) -> None:
    shards = _plan_shards(exports, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else []
    names = names or [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    for file, shard in zip(names, shards):
        # One shard in memory at a time.
        arrays = {e.name: np.ascontiguousarray(e.array(), dtype=e.dtype) for e in shard}
        save_file(arrays, folder / file, metadata={"format": "pt"})
        del arrays
        os.chmod(folder / file, _FILE_MODE)  # safetensors leaves it owner-only.
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in exports)},
            "weight_map": {e.name: file for file, shard in zip(names, shards) for e in shard},
        }
        _write_json(folder / INDEX_FILE, index)


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
    exports = _exports(config, params, dtype)
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


def stack_layers(params) -> dict:
    """Unscanned parameters ('layers_0', 'layers_1', ...) -> the scanned layout ('layers'
    with a leading L axis). Host numpy in, host numpy out."""
    params = _plain_params(params)
    if "layers" in params:
        return params
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [params[k] for k in names]
    stacked = _map_leaves(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *layers)
    return {**rest, "layers": stacked}


def unstack_layers(params) -> dict:
    """The scanned layout ('layers' with a leading L axis) -> 'layers_0', 'layers_1', ..."""
    params = _plain_params(params)
    if "layers" not in params:
        return params
    rest = {k: v for k, v in params.items() if k != "layers"}
    first = _first_leaf(params["layers"])
    for i in range(first.shape[0]):
        rest[f"layers_{i}"] = _map_leaves(lambda x, i=i: x[i], params["layers"])
    return rest


def _map_leaves(fn, *trees):
    if isinstance(trees[0], Mapping):
        return {key: _map_leaves(fn, *(t[key] for t in trees)) for key in trees[0]}
    return fn(*trees)


def _first_leaf(tree):
    while isinstance(tree, Mapping):
        tree = next(iter(tree.values()))
    return tree
