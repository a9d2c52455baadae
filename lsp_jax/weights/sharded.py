"""Parameters built shard by shard: each host reads only the checkpoint slices its devices hold.

`jax.make_array_from_callback` asks, for every addressable device, for the block of a
parameter that device holds (a tuple of slices in our layout). `read_block` maps that
block back to the Hugging Face tensor it comes from (undoing the transpose and the head
split of `layout.HfTensor.from_hf` and the layer stacking of the scanned layout), reads just
that slice through a `SliceReader` (safetensors `get_slice`, or rows and quant blocks of
a GGUF tensor), converts it and casts it to the parameter dtype. A host therefore holds
at most the blocks of one parameter that its own devices need, never a whole checkpoint.
"""

from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import numpy as np

from lsp_jax.errors import UserError
from lsp_jax.model.config import LlamaConfig
from lsp_jax.weights import layout

Bounds = tuple[tuple[int, int], ...]  # (start, stop) per axis.


class SliceReader(Protocol):
    """Hugging Face-named tensors of a checkpoint, read slice by slice."""

    def __iter__(self) -> Iterator[str]:
        """The Hugging Face names of all tensors."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in the Hugging Face layout, without reading its data."""

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` (contiguous slices, one per axis), Hugging Face layout."""


def index_bounds(index, shape) -> Bounds:
    """(start, stop) per axis of a device index from make_array_from_callback."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = []
    for axis_slice, size in zip(index, shape):
        start, stop, step = axis_slice.indices(size)
        if step != 1:
            raise ValueError(f"Strided shard index {index}: shardings never stride.")
        bounds.append((start, stop))
    return tuple(bounds)


def _axis_groups(shape, merged_shape) -> list[list[int]]:
    """Which of our axes make up each axis of `merged_shape` (our shape only splits
    axes of it: q's [D, N, H] from [D, N*H])."""
    groups, axis = [], 0
    for size in merged_shape:
        group, product = [], 1
        while axis < len(shape) and (not group or product < size):
            group.append(axis)
            product *= shape[axis]
            axis += 1
        if product != size:
            raise ValueError(f"Shape {shape} does not split the axes of {merged_shape}.")
        groups.append(group)
    if any(shape[a] != 1 for a in range(axis, len(shape))):
        raise ValueError(f"Shape {shape} does not split the axes of {merged_shape}.")
    groups[-1] += list(range(axis, len(shape)))
    return groups


def flat_positions(dims, bounds: Bounds) -> np.ndarray:
    """Row-major positions along the merged axis of the block `bounds` of axes `dims`
    (ascending, so the block is contiguous exactly when they form a range)."""
    grids = np.ix_(*[np.arange(start, stop) for start, stop in bounds])
    return np.ravel_multi_index(grids, tuple(dims)).reshape(-1)


def read_block(spec, reader: SliceReader, name: str, bounds: Bounds) -> np.ndarray:
    """The block `bounds` of one parameter (our layout, `spec.shape`, an layout.HfTensor)
    read from the Hugging Face tensor `name`, touching only the slice of it the block
    covers (its span, if a split axis such as head_dim is cut inside a merged axis)."""
    block_shape = tuple(stop - start for start, stop in bounds)
    if 0 in block_shape:
        return np.zeros(block_shape, np.float32)
    # Our layout is the (transposed, for Linear weights) HF tensor with axes split.
    merged_shape = spec.hf_shape[::-1] if spec.linear else spec.hf_shape
    groups = _axis_groups(spec.shape, merged_shape)
    positions = [
        flat_positions([spec.shape[a] for a in group], [bounds[a] for a in group])
        for group in groups
    ]
    merged_index = [slice(int(p[0]), int(p[-1]) + 1) for p in positions]
    hf_index = merged_index[::-1] if spec.linear else merged_index
    block = np.asarray(reader.read(name, tuple(hf_index)))
    block = block.T if spec.linear else block
    for axis, (p, merged) in enumerate(zip(positions, merged_index)):
        # Strided positions (a head_dim slice spanning several heads): the read covered
        # their span; keep the positions asked for.
        if p.size != merged.stop - merged.start:
            block = np.take(block, p - merged.start, axis=axis)
    return block.reshape(block_shape)


def read_leaf(source: layout.ParamSource, reader: SliceReader, bounds: Bounds, dtype) -> np.ndarray:
    """The block `bounds` of one parameter leaf, as a contiguous `dtype` array; a
    stacked (scanned) leaf reads the layers in its L range one at a time."""
    if not source.stacked:
        block = read_block(source.spec, reader, source.hf_names[0], bounds)
        return np.ascontiguousarray(block, dtype)
    (first, last), rest = bounds[0], bounds[1:]
    out = np.empty((last - first, *(stop - start for start, stop in rest)), dtype)
    for row, layer in enumerate(range(first, last)):
        out[row] = read_block(source.spec, reader, source.hf_names[layer], rest)  # Casts.
    return out


def make_array(shape, sharding, read: Callable[[Bounds], np.ndarray], dtype) -> jax.Array:
    """A global jax.Array whose addressable shards come from `read(bounds)`; devices
    holding the same block (replicated axes) share one read."""
    blocks = {}

    def callback(index):
        bounds = index_bounds(index, shape)
        if bounds not in blocks:
            blocks[bounds] = read(bounds)
        return blocks[bounds]

    return jax.make_array_from_callback(tuple(shape), sharding, callback, dtype=dtype)


def resolve_shardings(shardings, config: LlamaConfig):
    """A shardings tree, or a function config -> tree called with the loaded config."""
    return shardings(config) if callable(shardings) else shardings


def _key_paths(tree) -> dict[str, object]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def check_shardings(params_like, shardings) -> None:
    """Raises UserError unless `shardings` has exactly the params' keys, one Sharding each."""
    expected, given = _key_paths(params_like), _key_paths(shardings)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"The shardings do not match the parameters: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}. Build them from the same model config (scan_layers, "
            f"tie_embeddings), e.g. sharding.logical_shardings(placement.boxed_params(config),"
            f" mesh, rules), or pass a function config -> shardings."
        )
    for path, leaf in given.items():
        if not isinstance(leaf, jax.sharding.Sharding):
            raise UserError(
                f"shardings{path} is {type(leaf).__name__}, not a jax.sharding.Sharding "
                f"(unbox LogicallyPartitioned trees with sharding.logical_shardings first)."
            )


def params_from_slices(
    config: LlamaConfig, reader: SliceReader, shardings, *, source: str = "the checkpoint"
) -> dict:
    """Parameters of `Llama(config)` (layout per `config.scan_layers`, dtype
    `config.param_dtype`) as global jax.Arrays, each host reading only its shards.

    Args:
      config: the architecture; says which tensors to expect and their shapes.
      reader: the checkpoint's tensors under Hugging Face names, read by slices.
      shardings: a tree of jax.sharding.Sharding like the params (unboxed), or a
        function config -> such a tree.
      source: how error messages name the checkpoint.

    Raises:
      UserError: a tensor is missing, unexpected or of the wrong shape; the shardings
        do not match the parameters.
    """
    layout.check_names(config, reader, source)
    plan = layout.param_sources(config, scan_layers=config.scan_layers)
    shardings = resolve_shardings(shardings, config)
    check_shardings(plan, shardings)
    dtype = np.dtype(config.param_dtype)

    def leaf(param: layout.ParamSource, sharding) -> jax.Array:
        for name in param.hf_names:
            layout.check_tensor_shape(name, reader.shape(name), param.spec, source)
        read = lambda bounds: read_leaf(param, reader, bounds, dtype)
        return make_array(param.shape, sharding, read, dtype)

    return jax.tree.map(leaf, plan, shardings)


def place_host_params(params, shardings, config: LlamaConfig | None = None) -> dict:
    """Host numpy params as global jax.Arrays in `shardings` (a tree or a function
    config -> tree); each device gets its slice of the host array."""
    shardings = resolve_shardings(shardings, config)
    check_shardings(params, shardings)

    def leaf(array, sharding) -> jax.Array:
        array = np.asarray(array)
        read = lambda bounds: array[tuple(slice(start, stop) for start, stop in bounds)]
        return make_array(array.shape, sharding, read, array.dtype)

    return jax.tree.map(leaf, params, shardings)
