"""Ahead-of-time TPU compilation on any machine: per-chip HBM, FLOPs and MFU of a program.

libtpu (installed by `pip install 'jax[tpu]'`) contains the TPU compiler, and it
compiles for a *described* topology without any TPU attached: devices from
`jax.experimental.topologies.get_topology_desc` can back a mesh, jitted functions
lower and compile against ShapeDtypeStructs sharded over it, and the executable's
`memory_analysis()` tells how much HBM each chip would need. JAX's default backend
stays whatever it was (CPU here), so this runs beside CPU tests.

Usage:
    devices = topologies.topology_devices("v5e:2x4")
    mesh = sharding.make_mesh((1, -1, 1), devices=devices)
    fn, args = ...  # jitted function and ShapeDtypeStructs with NamedShardings on `mesh`
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # If fn uses logical names.
        report = compile_report(fn, *args, topology="v5e:2x4")
    print(format_report(report, flops_per_iteration=..., step_time_s=...))
"""

import dataclasses
import math
import re
import time
import warnings

import jax
import numpy as np

from lsp_jax.tpu.topologies import GiB, num_chips, parse_topology, topology_devices


@dataclasses.dataclass(frozen=True)
class Report:
    """What the TPU compiler says about one program, per chip (bytes).

    total_bytes ("total") is the compiler's peak of live HBM, `peak_memory_in_bytes`:
    arguments, outputs and temporaries alive at the worst moment, a donated argument
    and the output reusing it counted once. It is what libtpu checks against HBM: it
    compiled a 3B step whose peak was 14.9 GiB although arguments + outputs - donated +
    `temp_size_in_bytes` came to 16.6 GiB on a 15.75 GiB v5e chip. temp_bytes is that
    raw `temp_size_in_bytes`, which on TPU is not the temporaries at the peak: it
    leaves out smaller buffers (0 for programs with a 16 MiB intermediate) and covers
    buffers never live together; `peak_temp_bytes` is total minus the live arguments
    and outputs. When the compiler refuses a program (`compiled` False) total_bytes is
    the requirement its error message states, argument_bytes is computed from the
    argument shardings, and the other sizes are unknown (0).
    """

    topology: str
    num_chips: int  # In all slices.
    capacity_bytes: int
    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    alias_bytes: int
    total_bytes: int
    compiled: bool = True
    num_slices: int = 1
    xla_flops: float | None = None  # cost_analysis(): loop bodies counted once.
    message: str = ""
    hlo_text: str = dataclasses.field(default="", repr=False)  # The compiled program.

    @property
    def fits(self) -> bool:
        return self.compiled and self.total_bytes <= self.capacity_bytes

    @property
    def peak_temp_bytes(self) -> int:
        """Temporaries live at the peak: total - arguments - (outputs - donated)."""
        live_outputs = self.output_bytes - self.alias_bytes
        return self.total_bytes - self.argument_bytes - live_outputs


def compile_report(
    jitted_fn,
    *abstract_args,
    topology: str,
    num_slices: int = 1,
    capacity_bytes: int | None = None,
):
    """Lowers and compiles `jitted_fn(*abstract_args)` and reads its memory analysis.

    Args:
      jitted_fn: a `jax.jit`-wrapped function (plain functions are wrapped).
      abstract_args: pytrees of jax.ShapeDtypeStruct whose shardings live on a mesh of
        `topology_devices(topology)`.
      topology: the slice name the devices came from, e.g. 'v5e:2x4'.
      num_slices: how many such slices the devices span (multi-slice).
      capacity_bytes: HBM per chip to compare with (default: what the compiler allows).
    Returns:
      A Report; an out-of-memory refusal by the compiler is a Report with fits False.
    """
    generation, _ = parse_topology(topology)
    capacity = generation.usable_hbm_bytes if capacity_bytes is None else int(capacity_bytes)
    if not hasattr(jitted_fn, "lower"):
        jitted_fn = jax.jit(jitted_fn)
    common = dict(
        topology=topology,
        num_chips=num_slices * num_chips(topology),
        num_slices=num_slices,
        capacity_bytes=capacity,
    )
    start = time.perf_counter()
    lowered = jitted_fn.lower(*abstract_args)
    try:
        with warnings.catch_warnings():
            # With a persistent compilation cache (tests), jax stores compile-only
            # executables but cannot load them back; it warns and compiles again.
            warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
            compiled = lowered.compile()
    except Exception as error:  # XLA raises JaxRuntimeError; only out-of-memory is ours.
        required = _required_bytes(str(error))
        if "RESOURCE_EXHAUSTED" not in str(error) or required is None:
            raise
        return Report(
            **common,
            compile_seconds=time.perf_counter() - start,
            argument_bytes=per_chip_bytes(abstract_args),
            output_bytes=0,
            temp_bytes=0,
            code_bytes=0,
            alias_bytes=0,
            total_bytes=required,
            compiled=False,
            message=str(error).strip().splitlines()[0],
        )
    seconds = time.perf_counter() - start
    return _report_from(compiled, seconds, common)


def _report_from(compiled, seconds, common) -> Report:
    m = compiled.memory_analysis()
    summed = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Report(
        **common,
        compile_seconds=seconds,
        argument_bytes=int(m.argument_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        code_bytes=int(m.generated_code_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        total_bytes=int(getattr(m, "peak_memory_in_bytes", 0) or summed),
        xla_flops=(cost or {}).get("flops"),
        hlo_text=compiled.as_text(),
    )


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_REQUIRED_PATTERNS = (
    r"required for HLO temporaries \(([\d.]+)\s*([KMGT]?)",  # libtpu 0.0.4x
    r"Used ([\d.]+)\s*([KMGT]?) of [\d.]+\s*[KMGT]? hbm",  # older libtpu
)
_AVAILABLE_PATTERNS = (
    r"exceeds available HBM \(([\d.]+)\s*([KMGT]?)",
    r"Used [\d.]+\s*[KMGT]? of ([\d.]+)\s*([KMGT]?) hbm",
)


def _parse_bytes(message: str, patterns) -> int | None:
    for pattern in patterns:
        match = re.search(pattern, message)
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    return None


def _required_bytes(message: str) -> int | None:
    return _parse_bytes(message, _REQUIRED_PATTERNS)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (or arrays)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def compiler_hbm_limit(topology: str) -> int:
    """The HBM per chip libtpu's compiler allows, read from the message with which it
    refuses a program that needs 2 TiB on one chip (checks TOPOLOGIES' usable_hbm_bytes)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = topology_devices(topology)[0]
    mesh = Mesh(np.asarray([device]), ("chip",))
    replicated = NamedSharding(mesh, PartitionSpec())
    too_big = jax.ShapeDtypeStruct((2**39,), np.float32, sharding=replicated)
    try:
        jax.jit(lambda x: x * 2).lower(too_big).compile()
    except Exception as error:
        limit = _parse_bytes(str(error), _AVAILABLE_PATTERNS)
        if limit is not None:
            return limit
        raise
    raise RuntimeError(f"libtpu compiled a 4 TiB program for {topology}; cannot read its limit.")


def mfu(flops: float, step_time_s: float, num_chips: int, peak_flops: float) -> float:
    """Model FLOPs utilization: flops / (step_time · chips · peak FLOP/s per chip)."""
    return flops / (step_time_s * num_chips * peak_flops)


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB / KiB for small programs."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n / 2**10:8.2f} KiB"


def format_report(report: Report, *, flops_per_iteration=None, step_time_s=None) -> str:
    """A table of per-chip HBM against capacity, and FLOPs/MFU if given.

    flops_per_iteration: a number, or a dict of named parts (e.g. from
      `self_play_flops`) whose 'total' entry is used.
    step_time_s: a measured or hoped-for iteration time; gives the MFU it would mean.
    """
    generation, _ = parse_topology(report.topology)
    cap = report.capacity_bytes
    pct = lambda n: f"{100 * n / cap:6.1f}%"
    slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
    lines = [
        f"TPU {report.topology}{slices}: {report.num_chips} chips, {cap / GiB:.2f} GiB usable "
        f"HBM per chip, compiled in {report.compile_seconds:.1f} s",
        "per chip                  bytes      of HBM",
        f"  arguments        {_gib(report.argument_bytes)}  {pct(report.argument_bytes)}",
    ]
    if report.compiled:
        outputs = report.output_bytes - report.alias_bytes
        temps = report.peak_temp_bytes
        lines += [
            f"  outputs          {_gib(outputs)}  {pct(outputs)}  (not in donated buffers)",
            f"  temporaries      {_gib(temps)}  {pct(temps)}  (live at the peak)",
        ]
    verdict = "fits" if report.fits else "DOES NOT FIT"
    total = report.total_bytes
    lines.append(f"  total (peak)     {_gib(total)}  {pct(total)}  {verdict}")
    if report.compiled:
        lines.append(
            f"  (XLA: temp allocation {_gib(report.temp_bytes).strip()}, donated "
            f"{_gib(report.alias_bytes).strip()}, generated code {_gib(report.code_bytes).strip()})"
        )
    if report.message:
        lines.append(f"  compiler: {report.message}")
    lines += _flops_lines(report, generation, flops_per_iteration, step_time_s)
    return "\n".join(lines)


def _flops_lines(report, generation, flops, step_time_s) -> list[str]:
    lines = []
    if isinstance(flops, dict):
        lines.append("FLOPs per iteration (analytic):")
        lines += [f"  {k:<24} {v:10.3e}" for k, v in flops.items() if k != "total"]
        flops = flops["total"]
    if flops is None:
        if report.xla_flops:
            lines.append(
                f"XLA cost analysis: {report.xla_flops:.3e} FLOPs per chip (counts loop "
                "bodies once: an undercount for scanned layers and decode loops)"
            )
        return lines
    peak = report.num_chips * generation.peak_flops
    lines.append(
        f"FLOPs per iteration      {flops:10.3e}  ({flops / report.num_chips:.3e} per chip; "
        f"{generation.peak_flops / 1e12:.0f} TFLOP/s bf16 peak per chip)"
    )
    lines.append(f"  time at 100% MFU       {flops / peak:10.3f} s")
    if step_time_s:
        value = mfu(flops, step_time_s, report.num_chips, generation.peak_flops)
        lines.append(f"  MFU at {step_time_s:g} s/iteration   {100 * value:6.2f}%")
    return lines
