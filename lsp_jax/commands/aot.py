"""`lsp-jax aot`: compile one training iteration for a TPU topology and report its HBM."""

import os

EPILOG = """\
Compiles the self-play iteration of a config with the TPU compiler (libtpu, from
pip install 'jax[tpu]'), on any machine: no TPU needed. Prints the HBM per chip
(arguments, temporaries, peak) against the chip's capacity, the iteration's FLOPs and,
with --step-time, the MFU that time means. Then, per phase (rollout_params,
challenger_rollout, solver_rollout, rewards, reference, update), the FLOPs, HBM bytes
and collective bytes per chip counted from the compiled program (loop bodies times
their trip counts), the bytes all-gathered per decode step against the policy's bf16
weights, and a roofline ESTIMATE of each phase's time and the MFU it implies.
Exits 1 when the iteration does not fit.
Topologies: v4:2x2x1, v5e:1x1, v5e:2x4, v5p:2x2x1, v6e:2x4, ... (GENERATION:CHIPS).
Override config keys as for train, e.g.
  lsp-jax aot --config configs/lsp_llama3_2_3b.py --topology v5e:2x4 \\
      --config.game.num_queries=16 --step-time 30
"""


def add_arguments(parser):
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="ml_collections config file, e.g. configs/lsp_llama3_2_3b.py.",
    )
    parser.add_argument(
        "--topology", required=True, help="TPU slice to compile for, e.g. v5e:2x4 or v4:2x2x1."
    )
    parser.add_argument(
        "--step-time",
        type=float,
        default=None,
        metavar="S",
        help="Seconds per iteration (measured or hoped for): report the MFU it means.",
    )
    parser.add_argument(
        "--hlo-out",
        default=None,
        metavar="FILE",
        help="Also write the compiled program's HLO text here (to read what moves where).",
    )
    parser.epilog = EPILOG
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    parser.set_defaults(accepts_overrides=True)


def run(args) -> int:
    # Compile-only TPU devices need no TPU backend: keep a local TPU (if any) free for
    # training jobs. Must precede the first JAX backend use.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from lsp_jax.train import config as config_lib

    config = config_lib.config_from_command_line(args.config, args.overrides, "aot")
    return compile_and_report(
        config, args.topology, step_time_s=args.step_time, hlo_out=args.hlo_out
    )


def _phase_costs(report, abstract_args, flops, topology) -> str:
    """Per-phase FLOPs, HBM and collective bytes counted from the compiled program, the
    decode steps' all-gathers, and the roofline estimate (lsp_jax.tpu.roofline)."""
    import math

    import jax

    from lsp_jax.tpu import hlo, roofline, topologies

    generation, _ = topologies.parse_topology(topology)
    # The policy's parameters: the train state's, or (a stand-in program) its first input.
    params = getattr(abstract_args[0], "params", abstract_args[0])
    policy_bf16 = 2 * sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    total_flops = flops.get("total") if isinstance(flops, dict) else flops
    return roofline.format_costs(
        hlo.program_costs(report.hlo_text),
        generation,
        num_chips=report.num_chips,
        policy_bf16_bytes=policy_bf16,
        model_flops=total_flops,
    )


def compile_and_report(config, topology: str, *, step_time_s=None, hlo_out=None) -> int:
    """Builds the config's mesh on `topology` (times the slices of mesh.dcn_shape),
    compiles the iteration, prints the report. Returns 0 when it fits in HBM, 1 if not."""
    import math
    import sys

    import flax.linen as nn
    import jax

    from lsp_jax.runtime import sharding
    from lsp_jax.tpu import aot, topologies

    dcn_shape = tuple(int(s) for s in config.mesh.dcn_shape)
    num_slices = math.prod(dcn_shape)
    devices = topologies.topology_devices(topology, num_slices=num_slices)
    mesh = sharding.make_mesh(config.mesh.shape, dcn_shape, devices=devices)
    fn, abstract_args, flops = _abstract_iteration(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.mesh.rules)):
        report = aot.compile_report(fn, *abstract_args, topology=topology, num_slices=num_slices)
    print(aot.format_report(report, flops_per_iteration=flops, step_time_s=step_time_s))
    if report.compiled:
        print(_phase_costs(report, abstract_args, flops, topology))
        if hlo_out:
            with open(hlo_out, "w") as f:
                f.write(report.hlo_text)
            print(f"Compiled program written to {hlo_out}")
    if report.fits:
        return 0
    gib = topologies.GiB
    print(
        f"lsp-jax aot: the iteration does not fit on {topology}: it needs "
        f"{report.total_bytes / gib:.2f} GiB per chip and a chip has "
        f"{report.capacity_bytes / gib:.2f} GiB. Use more chips (a larger topology or more "
        "fsdp), fewer queries/answers per iteration, shorter max_query_tokens/"
        "max_answer_tokens, loss.logprob_chunk, or model.remat=True.",
        file=sys.stderr,
    )
    return 1


def _abstract_iteration(config, mesh):
    """(jitted_fn, abstract_args, flops or None) from lsp_jax.train.run.abstract_iteration,
    which returns (jitted_fn, abstract_args) or (jitted_fn, abstract_args, flops), flops
    being a number or a dict of parts such as lsp_jax.tpu.flop_counts.step_flops gives."""
    from lsp_jax.errors import UserError
    from lsp_jax.train import run

    build = getattr(run, "abstract_iteration", None)
    if build is None:
        raise UserError(
            "This version of lsp_jax has no lsp_jax.train.run.abstract_iteration, so it "
            "cannot compile the training iteration ahead of time yet."
        )
    result = tuple(build(config, mesh))
    fn, abstract_args = result[:2]
    return fn, tuple(abstract_args), (result[2] if len(result) > 2 else None)
