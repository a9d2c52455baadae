"""XLA's per-device arguments and temporaries of the shipped configs' training iteration.

    python benchmarks/train_memory.py                        # configs/smollm2_cpu.py on CPU
    python benchmarks/train_memory.py --config.model.remat=False   # overrides as for train
    python benchmarks/train_memory.py --aot v5e:2x4          # and the 3B configs on a TPU slice

The CPU default is compiled for this machine's CPU exactly as `lsp-jax train` compiles it
(weights loaded, nothing run); the 3B configs go through `lsp-jax aot` (libtpu's compiler,
architectures from their presets, no weights). A regression in either shows as a larger
figure here. To see what the temporaries are, add
XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text" and read DIR/*run_iterations*
buffer-assignment.txt (the values of the preallocated-temp allocation, largest first).
"""

import argparse
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(ROOT, "configs", "smollm2_cpu.py")
AOT_CONFIGS = ("lsp_llama3_2_3b.py", "lsp_zero_llama3_2_3b.py", "grpo_llama3_2_3b.py")


def cpu_memory(overrides) -> tuple[float, float]:
    """(arguments GiB, temporaries GiB) of the CPU default's compiled iteration."""
    from lsp_jax.train import config as config_lib
    from lsp_jax.train import loop
    from lsp_jax.train import placement as placement_lib
    from lsp_jax.train import run as run_lib

    config = config_lib.load_config(CPU_CONFIG)
    config_lib.apply_overrides(config, overrides)
    mesh = run_lib.make_mesh(config)
    run = run_lib.build_run(config, mesh)
    placement = placement_lib.plan(
        run.step_cfg, run.optimizer, run.frozen, mesh, run_lib.mesh_rules(config)
    )
    run.frozen = placement_lib.place_frozen(run.frozen, placement)
    state = placement_lib.place_state(run.params, run.optimizer, config.train.seed, placement)
    compiled, seconds = loop.compile_step(run, placement, state, 1)
    m = compiled.memory_analysis()
    gib = 2**30
    print(f"compiled in {seconds:.0f} s", file=sys.stderr)
    return m.argument_size_in_bytes / gib, m.temp_size_in_bytes / gib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aot", metavar="TOPOLOGY", help="also the 3B configs, e.g. v5e:2x4")
    args, overrides = parser.parse_known_args(argv)
    overrides = [o.removeprefix("--config.") for o in overrides]
    arguments, temporaries = cpu_memory(overrides)
    print(
        f"smollm2_cpu (CPU) {' '.join(overrides)}: {arguments:.2f} GiB arguments, "
        f"{temporaries:.2f} GiB temporaries per device",
        flush=True,
    )
    status = 0
    for name in AOT_CONFIGS if args.aot else ():
        command = [sys.executable, "-m", "lsp_jax.cli", "aot", "--config"]
        command += [os.path.join(ROOT, "configs", name), "--topology", args.aot]
        print(f"\n{name} on {args.aot}:", flush=True)
        status |= subprocess.run(command).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
