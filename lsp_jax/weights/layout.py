"""Our parameter tree <-> Hugging Face Llama tensor names, shapes and transposes; the
mapping both the safetensors reader/writer (hf.py) and the sharded reader (sharded.py)
follow, and the scanned <-> unscanned layer layouts."""

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
from flax.linen import meta

from lsp_jax.errors import UserError
from lsp_jax.model.config import LlamaConfig

# Tensors some checkpoints carry that hold nothing the model needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class HfTensor:
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


def _layer_tensors(config: LlamaConfig) -> tuple[HfTensor, ...]:
    d, n, k, h, f = (
        config.dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
    )
    prefix = "model.layers.{i}."
    return (
        HfTensor(("attn_norm", "scale"), prefix + "input_layernorm.weight", (d,), (d,), False),
        HfTensor(("attn", "q"), prefix + "self_attn.q_proj.weight", (d, n, h), (n * h, d), True),
        HfTensor(("attn", "k"), prefix + "self_attn.k_proj.weight", (d, k, h), (k * h, d), True),
        HfTensor(("attn", "v"), prefix + "self_attn.v_proj.weight", (d, k, h), (k * h, d), True),
        HfTensor(("attn", "o"), prefix + "self_attn.o_proj.weight", (n, h, d), (d, n * h), True),
        HfTensor(
            ("mlp_norm", "scale"), prefix + "post_attention_layernorm.weight", (d,), (d,), False
        ),
        HfTensor(("mlp", "gate"), prefix + "mlp.gate_proj.weight", (d, f), (f, d), True),
        HfTensor(("mlp", "up"), prefix + "mlp.up_proj.weight", (d, f), (f, d), True),
        HfTensor(("mlp", "down"), prefix + "mlp.down_proj.weight", (f, d), (d, f), True),
    )


def _head_tensors(config: LlamaConfig) -> tuple[tuple[HfTensor, ...], tuple[HfTensor, ...]]:
    """Tensors before the layers (embedding) and after them (norm, LM or score head)."""
    d, v = config.dim, config.vocab_size
    before = (HfTensor(("embed", "embedding"), "model.embed_tokens.weight", (v, d), (v, d), False),)
    after = [HfTensor(("final_norm", "scale"), "model.norm.weight", (d,), (d,), False)]
    if config.is_classifier:
        c = config.num_labels
        after.append(HfTensor(("score", "kernel"), "score.weight", (d, c), (c, d), True))
    elif not config.tie_embeddings:
        after.append(HfTensor(("lm_head", "kernel"), "lm_head.weight", (d, v), (v, d), True))
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


def check_tensor_shape(name: str, found, spec: HfTensor, source: str) -> None:
    """Raises UserError when a checkpoint tensor's shape is not the one the config implies."""
    if tuple(found) != spec.hf_shape:
        raise UserError(
            f"Tensor {name!r} in {source}: expected shape {spec.hf_shape} (from the model "
            f"config), found {tuple(found)}. The config does not match these weights."
        )


def _read(spec: HfTensor, tensors: Mapping, layer: int | None, source: str) -> np.ndarray:
    """One tensor in our layout (a view of the loaded array), with its shape checked."""
    name = spec.hf_name.format(i=layer)
    tensor = np.asarray(tensors[name])
    check_tensor_shape(name, tensor.shape, spec, source)
    return spec.from_hf(tensor)


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Where one parameter leaf comes from: Hugging Face tensors in the layout `spec`
    describes; one tensor, or one per layer stacked on a leading L axis (`stacked`)."""

    spec: HfTensor
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
class HfExport:
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


def hf_exports(config: LlamaConfig, params, dtype=None) -> list[HfExport]:
    """Every tensor of the Hugging Face checkpoint, in transformers' order, unmaterialized."""
    params = _plain_params(params)
    scanned = "layers" in params
    before, after = _head_tensors(config)
    out = []

    def add(spec: HfTensor, name: str, get: Callable[[], np.ndarray], leaf_dtype) -> None:
        out_dtype = np.dtype(leaf_dtype if dtype is None else dtype)
        out.append(HfExport(name, spec.hf_shape, out_dtype, lambda: spec.to_hf(np.asarray(get()))))

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
    return {e.name: e.array() for e in hf_exports(config, params)}


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
