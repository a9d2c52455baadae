"""Device meshes and logical-axis sharding: the only module that names mesh axes."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

from lsp_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_shape(shape, num_devices: int, *, what: str = "mesh.shape") -> tuple[int, ...]:
    """Replaces one -1 in `shape` by the devices left over; checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(f"{what}={shape} must have {len(MESH_AXES)} entries {MESH_AXES}.")
    if shape.count(-1) > 1:
        raise UserError(f"{what}={shape} may contain at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(f"{what}={shape}: {num_devices} devices are not divisible by {known}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"{what}={shape} covers {math.prod(shape)} devices but {num_devices} are "
            f"available; make the product equal {num_devices} (or use -1 for one axis)."
        )
    return shape


def make_mesh(shape=(1, -1, 1), dcn_shape=(1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (flax's logical
    constraints need them). `dcn_shape` splits axes across slices (multi-slice TPU
    pods); `shape` is the per-slice (ICI) part."""
    devices = jax.devices() if devices is None else devices
    dcn_shape = tuple(int(s) for s in dcn_shape)
    num_slices = math.prod(dcn_shape)
    ici_shape = resolve_shape(shape, len(devices) // num_slices)
    if num_slices > 1:
        array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
    else:
        try:
            array = mesh_utils.create_device_mesh(ici_shape, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            array = np.asarray(devices).reshape(ici_shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(array, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(mesh: jax.sharding.Mesh, *, num_queries: int, answers_per_query: int):
    """Rollout rows are split over data × fsdp: refuse uneven batches before compiling."""
    size = data_parallel_size(mesh)
    rows = num_queries * answers_per_query
    if rows % size:
        multiples = [m for m in range(size, 4 * size + 1, size)]
        raise UserError(
            f"The Solver batch N·G = {num_queries}·{answers_per_query} = {rows} rows is not "
            f"divisible by the data×fsdp mesh size {mesh.shape['data']}×{mesh.shape['fsdp']}"
            f" = {size}. Change game.num_queries or game.answers_per_query so that N·G is a "
            f"multiple of {size} (e.g. {multiples}), or change mesh.shape."
        )


def spec_for(names, shape, mesh, rules) -> PartitionSpec:
    """Logical names -> mesh axes, dropping any mesh axis that does not divide its
    dimension (small models on big meshes replicate those dimensions instead).

    Dimensions pick their mesh axes in the order their names appear in `rules`, so an
    earlier rule has priority: with ('heads', ('fsdp', 'tensor')) before
    ('embed', ('fsdp', 'tensor')), a [D, N, H] weight splits its heads over both axes
    when they divide N, and its D only over the axes the heads could not use.
    `mesh` is a Mesh or an AbstractMesh (anything with a `shape` mapping).
    """
    rule_map, rank = {}, {}
    for i, (name, target) in enumerate(rules):
        rule_map.setdefault(name, target)
        rank.setdefault(name, i)
    order = sorted(range(len(shape)), key=lambda d: rank.get(names[d], len(rules)))
    used, spec = set(), [None] * len(shape)
    for d in order:
        name, dim = names[d], shape[d]
        target = rule_map.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in axes:
            size = math.prod(mesh.shape[a] for a in kept + [axis])
            if axis not in used and mesh.shape[axis] > 1 and dim % size == 0:
                kept.append(axis)
        used.update(kept)
        spec[d] = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
    return PartitionSpec(*spec)


def logical_shardings(abstract_tree, mesh, rules):
    """NamedShardings for a tree whose leaves may be flax LogicallyPartitioned boxes;
    unboxed leaves are replicated."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(
        one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def constrain_logical(tree, names_tree, rules):
    """Reshards every array of `tree` inside a jitted program to the layout `rules` gives
    its logical axis names (`names_tree`: the same structure, a tuple of names per
    array). A no-op outside a mesh context (`jax.set_mesh`) or without rules.

    This is how a program changes layout mid-way: e.g. the self-play iteration keeps its
    parameters FSDP-sharded for the update and reshards a copy for the rollouts.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return tree

    def one(x, names):
        return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh, rules))

    return jax.tree.map(one, tree, names_tree)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Rows over data × fsdp, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain_rows(x, mesh):
    """Shards the leading (row) axis of every array in `x` over data × fsdp, when it
    divides; a no-op without a mesh."""
    if mesh is None:
        return x

    def one(a):
        if a.ndim == 0 or a.shape[0] % data_parallel_size(mesh):
            return a
        return jax.lax.with_sharding_constraint(a, batch_sharding(mesh, a.ndim))

    return jax.tree.map(one, x)


def is_multi_process_environment(environ=None) -> bool:
    """True when this process is one of several (TPU pod hosts, multi-node GPU jobs).

    jax.distributed.initialize() then finds the coordinator, process count and id by
    itself: from TPU metadata, from SLURM/Open MPI variables, or from
    JAX_COORDINATOR_ADDRESS. A single-node SLURM allocation also has SLURM variables,
    so only several tasks count.
    """
    import os

    env = os.environ if environ is None else environ
    if env.get("LSP_JAX_DISTRIBUTED") in ("0", "1"):  # Explicit choice (launch scripts).
        return env["LSP_JAX_DISTRIBUTED"] == "1"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    # Cloud TPU VMs list every worker of a pod slice in TPU_WORKER_HOSTNAMES.
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize_distributed() -> None:
    """Calls jax.distributed.initialize() once, when running on several hosts."""
    if is_multi_process_environment() and not jax.distributed.is_initialized():
        jax.distributed.initialize()
