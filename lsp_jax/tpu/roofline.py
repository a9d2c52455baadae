"""Roofline estimates of a compiled self-play iteration: each phase's time on a TPU
generation from its per-chip FLOPs, HBM bytes and collective bytes (lsp_jax.tpu.hlo).

An estimate, not a measurement: a phase takes at least the longest of
  compute    FLOPs / peak bf16 FLOP/s
  memory     HBM bytes / HBM bandwidth
  network    collective bytes / ICI bandwidth (one direction per chip)
assuming the three overlap perfectly; real programs also pay latency per step, which
decode loops of thousands of small steps feel most. Chip figures: lsp_jax.tpu.topologies.TOPOLOGIES.
"""

import dataclasses

from lsp_jax.tpu import hlo

MiB, GiB = 2**20, 2**30


@dataclasses.dataclass(frozen=True)
class Estimate:
    compute_s: float
    memory_s: float
    network_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s, self.network_s)

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_s, "memory": self.memory_s, "network": self.network_s}
        return max(times, key=times.get)


def _size(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def estimate(costs: hlo.Costs, generation) -> Estimate:
    return Estimate(
        compute_s=costs.flops / generation.peak_flops,
        memory_s=costs.hbm_bytes / generation.hbm_bandwidth,
        network_s=costs.total_collective_bytes / generation.ici_bandwidth,
    )


def decode_summary(program: hlo.ProgramCosts, phase: str):
    """(decode steps, the phase's worst per-step all-gather bytes, worst per-step
    collective bytes) over its decode loops; None when the phase does not decode."""
    loops = [d for d in program.decode_loops if d.phase == phase]
    if not loops:
        return None
    return (
        sum(d.steps for d in loops),
        max(d.per_step.all_gather_bytes for d in loops),
        max(d.per_step.total_collective_bytes for d in loops),
    )


def format_costs(
    program: hlo.ProgramCosts,
    generation,
    *,
    num_chips: int,
    policy_bf16_bytes: float,
    model_flops: float | None = None,
) -> str:
    """The per-phase table (per chip), the decode-step collectives against the policy's
    bf16 weights, and the roofline estimate of the iteration with the MFU it implies."""
    lines = [
        f"Per chip, counted from the compiled program (loops x trip counts; decode loops at "
        f"their full length; HBM bytes at fusion boundaries, an upper bound). Roofline "
        f"ESTIMATE on {generation.name}: "
        f"{generation.peak_flops / 1e12:.0f} TFLOP/s, HBM {generation.hbm_bandwidth / 1e9:.0f} "
        f"GB/s, ICI {generation.ici_bandwidth / 1e9:.0f} GB/s per chip.",
        f"  {'phase':<19}{'FLOPs':>11}{'HBM':>13}{'collectives':>13}{'all-gather':>13}"
        f"{'est. s':>10}  bound",
    ]
    total_s = 0.0
    for phase in (*hlo.PHASES, hlo.OTHER):
        costs = program.phases.get(phase)
        if costs is None:
            continue
        est = estimate(costs, generation)
        total_s += est.seconds
        lines.append(
            f"  {phase:<19}{costs.flops:11.3e}{_size(costs.hbm_bytes):>13}"
            f"{_size(costs.total_collective_bytes):>13}{_size(costs.all_gather_bytes):>13}"
            f"{est.seconds:10.4f}  {est.bound}"
        )
    lines.append(f"  {'iteration (sum)':<19}{'':50}{total_s:10.4f}")
    if model_flops:
        mfu = model_flops / (total_s * num_chips * generation.peak_flops)
        lines.append(f"  MFU this estimate implies (analytic model FLOPs): {100 * mfu:.1f}%")
    for phase in hlo.PHASES:
        summary = decode_summary(program, phase)
        if summary is None:
            continue
        steps, gathered, moved = summary
        share = gathered / policy_bf16_bytes if policy_bf16_bytes else 0.0
        lines.append(
            f"  {phase} decode: {steps} steps; per step at most {gathered / MiB:.3f} MiB "
            f"all-gathered ({100 * share:.3f}% of the policy's bf16 weights, "
            f"{policy_bf16_bytes / GiB:.2f} GiB), {moved / MiB:.3f} MiB through collectives"
        )
    if program.unknown_trip_counts:
        lines.append(
            f"  ({program.unknown_trip_counts} while loops without a readable bound were "
            "counted once.)"
        )
    return "\n".join(lines)
