"""Decode cost of a rollout in the rollout layout against the training (FSDP) layout,
side by side, from programs compiled for a TPU slice with libtpu (no TPU needed).

For one preset and topology, compiles the sampler twice (FSDP float32 parameters used
as they are, and cast + resharded by mesh.rollout_rules as the self-play iteration
does), reads both compiled programs with lsp_jax.tpu.hlo and prints, per decode step and
per chip: bytes all-gathered, bytes through all collectives, HBM bytes, FLOPs, and the
roofline ESTIMATE of a step's time; then the ratios training/rollout layout.

    python benchmarks/rollout_layout.py [--preset llama3_2_1b] [--topology v5e:2x4]
        [--rows 32] [--prompt-len 64] [--new-tokens 32]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lsp_jax.model import LlamaConfig
    from lsp_jax.runtime import sharding
    from lsp_jax.tpu import hlo, programs, roofline, topologies
    from lsp_jax.train import config as config_lib
    from lsp_jax.train import run as run_lib

    defaults = config_lib.default_config().mesh
    rules = run_lib.rules_table(defaults.rules)
    generation, _ = topologies.parse_topology(args.topology)
    mesh = sharding.make_mesh((1, -1, 1), devices=topologies.topology_devices(args.topology))
    cfg = getattr(LlamaConfig, args.preset)(dtype=jnp.bfloat16, scan_layers=True)
    rows = {}
    for name, rollout_rules in (
        ("training layout", ()),
        ("rollout layout", run_lib.rules_table(defaults.rollout_rules)),
    ):
        fn, fn_args = programs.sampler_program(
            cfg,
            mesh,
            rules,
            rollout_rules=rollout_rules,
            prompts=args.rows // 8,
            group_size=8,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
        )
        start = time.perf_counter()
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            text = fn.lower(*fn_args).compile().as_text()
        seconds = time.perf_counter() - start
        (decode,) = hlo.program_costs(text).decode_loops
        step = decode.per_step
        est = roofline.estimate(step, generation)
        rows[name] = (step, est)
        print(
            f"{name:16} compile {seconds:6.1f} s | per decode step per chip: all-gather "
            f"{step.all_gather_bytes / 2**20:9.3f} MiB, collectives "
            f"{step.total_collective_bytes / 2**20:9.3f} MiB, HBM {step.hbm_bytes / 2**20:8.1f} "
            f"MiB, {step.flops:.3e} FLOPs; estimate {1e3 * est.seconds:7.3f} ms ({est.bound})"
        )
    (old, old_est), (new, new_est) = rows["training layout"], rows["rollout layout"]
    print(
        f"ratio training/rollout layout: all-gather bytes "
        f"{old.all_gather_bytes / max(new.all_gather_bytes, 1):.0f}x, collective bytes "
        f"{old.total_collective_bytes / max(new.total_collective_bytes, 1):.1f}x, "
        f"estimated step time {old_est.seconds / new_est.seconds:.1f}x "
        f"({args.preset}, {args.rows} rows, {args.topology}; roofline estimates)"
    )


if __name__ == "__main__":
    main()
