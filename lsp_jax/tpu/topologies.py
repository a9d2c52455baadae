"""TPU topologies described without a TPU: each generation's chip figures, topology names
("v5e:2x4") parsed, and the devices libtpu describes for them, which a mesh can be built
on and programs compiled for (lsp_jax.tpu.aot)."""

import contextlib
import dataclasses
import importlib.util
import math
import os

import jax

from lsp_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One TPU chip generation.

    hbm_bytes: HBM per chip on the data sheet.
    usable_hbm_bytes: what libtpu's compiler lets one program use per chip (it refuses
      bigger programs); read from its out-of-memory message, see `aot.compiler_hbm_limit`.
    peak_flops: dense bf16 FLOP/s per chip.
    hbm_bandwidth: HBM bytes/s per chip.
    ici_bandwidth: inter-chip interconnect bytes/s per chip, one direction (the
      data sheets' Gbps figure / 8), for roofline estimates of collectives.
    num_dims: 2 (v5e, v6e: 2D torus, 'v5e:2x4') or 3 (v4, v5p: 'v4:2x2x1').
    chip_config: libtpu's chip_config_name; 'megacore' shows a chip's two TensorCores
      as one device, as JAX does on v4 and v5p VMs.
    """

    name: str
    hbm_bytes: int
    usable_hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float
    num_dims: int
    chip_config: str
    examples: tuple[str, ...]


TOPOLOGIES = {
    g.name: g
    for g in (
        TpuGeneration(
            name="v4",
            hbm_bytes=32 * GiB,
            usable_hbm_bytes=int(30.75 * GiB),
            peak_flops=275e12,
            # Cloud TPU docs, "TPU v4": HBM2 32 GiB at 1200 GBps. ICI 2400 Gbps per chip
            # (v5p's 4800 Gbps is announced as twice v4's).
            hbm_bandwidth=1200e9,
            ici_bandwidth=2400e9 / 8,
            num_dims=3,
            chip_config="megacore",
            examples=("v4:2x2x1", "v4:2x2x2"),
        ),
        TpuGeneration(
            name="v5e",
            hbm_bytes=16 * GiB,
            usable_hbm_bytes=int(15.75 * GiB),
            peak_flops=197e12,
            # Cloud TPU docs, "TPU v5e": HBM2 16 GB at 819 GBps; ICI 1600 Gbps per chip.
            hbm_bandwidth=819e9,
            ici_bandwidth=1600e9 / 8,
            num_dims=2,
            chip_config="default",
            examples=("v5e:1x1", "v5e:2x2", "v5e:2x4"),
        ),
        TpuGeneration(
            name="v5p",
            hbm_bytes=95 * GiB,
            usable_hbm_bytes=int(95.74 * GiB),
            peak_flops=459e12,
            # Cloud TPU docs, "TPU v5p": HBM2e 95 GB at 2765 GBps; ICI 4800 Gbps per chip.
            hbm_bandwidth=2765e9,
            ici_bandwidth=4800e9 / 8,
            num_dims=3,
            chip_config="megacore",
            examples=("v5p:2x2x1", "v5p:2x2x2"),
        ),
        TpuGeneration(
            name="v6e",
            hbm_bytes=32 * GiB,
            usable_hbm_bytes=int(31.25 * GiB),
            peak_flops=918e12,
            # Cloud TPU docs, "TPU v6e": HBM 32 GB at 1640 GBps; ICI 3584 Gbps per chip.
            hbm_bandwidth=1640e9,
            ici_bandwidth=3584e9 / 8,
            num_dims=2,
            chip_config="default",
            examples=("v6e:1x1", "v6e:2x4"),
        ),
    )
}


ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}


# libtpu places 2x2x1 chips on each host by default; smaller slices need smaller bounds.
DEFAULT_CHIPS_PER_HOST = (2, 2, 1)


def _valid_names() -> str:
    return ", ".join(e for g in TOPOLOGIES.values() for e in g.examples)


def parse_topology(name: str) -> tuple[TpuGeneration, tuple[int, ...]]:
    """'v5e:2x4' -> (the v5e generation, (2, 4)). Raises UserError for unknown names."""
    gen_name, sep, shape_text = str(name).strip().lower().partition(":")
    gen_name = ALIASES.get(gen_name, gen_name)
    generation = TOPOLOGIES.get(gen_name)
    hint = f"Write GENERATION:SHAPE with a generation in {list(TOPOLOGIES)}, e.g. {_valid_names()}."
    if generation is None or not sep:
        raise UserError(f"Unknown TPU topology {name!r}. {hint}")
    try:
        shape = tuple(int(s) for s in shape_text.split("x"))
    except ValueError:
        raise UserError(f"Bad chip layout in TPU topology {name!r}. {hint}") from None
    if len(shape) != generation.num_dims or min(shape) < 1:
        raise UserError(
            f"TPU topology {name!r}: {generation.name} slices are {generation.num_dims}-D chip "
            f"grids like {generation.examples[-1]!r}. {hint}"
        )
    return generation, shape


def num_chips(topology: str) -> int:
    return math.prod(parse_topology(topology)[1])


# Read by libtpu when it loads. Without TPU chips they stop its search for TPU hosts
# (which only warns) and its single-process lockfile (compile-only use may run next to
# other JAX processes that loaded libtpu).
_NO_TPU_ENVIRONMENT = {
    "TPU_SKIP_MDS_QUERY": "1",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
}


@contextlib.contextmanager
def _libtpu_environment():
    """Sets _NO_TPU_ENVIRONMENT (where unset) while libtpu loads, on machines without
    TPU chips only; restores the environment afterwards."""
    try:
        from jax._src import hardware_utils

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # Private API moved: assume a machine without TPUs.
        chips = 0
    added = {} if chips else {k: v for k, v in _NO_TPU_ENVIRONMENT.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _check_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise UserError(
            "TPU ahead-of-time compilation needs libtpu, the TPU compiler: "
            f"pip install 'jax[tpu]=={jax.__version__}' (it works on machines without TPUs)."
        )


def topology_devices(name: str, *, num_slices: int = 1) -> list:
    """Compile-only devices of a TPU slice, one per chip, e.g. 8 for 'v5e:2x4'.

    num_slices > 1 describes that many slices joined by the data-center network
    (multi-slice); the devices then carry `slice_index` for sharding.make_mesh's
    dcn_shape. Raises UserError for unknown names (listing valid ones) and when
    libtpu is missing.
    """
    generation, shape = parse_topology(name)
    _check_libtpu()
    from jax.experimental import topologies

    shape3 = shape + (1,) * (3 - len(shape))
    per_host = [min(s, d) for s, d in zip(shape3, DEFAULT_CHIPS_PER_HOST)]
    libtpu_name = f"{generation.name}:{'x'.join(map(str, shape))}"
    slices = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        with _libtpu_environment():
            topology = topologies.get_topology_desc(
                platform="tpu",
                topology_name=libtpu_name,
                chip_config_name=generation.chip_config,
                chips_per_host_bounds=per_host,
                **slices,
            )
    except RuntimeError as error:  # JaxRuntimeError is a RuntimeError.
        raise UserError(
            f"libtpu cannot build TPU topology {name!r}: {error}. Valid examples: {_valid_names()}."
        ) from None
    return list(topology.devices)
