"""Per-chip HBM of a Llama training step on a TPU topology, compiled here without a TPU.

    python benchmarks/aot_memory.py --model llama3_2_3b --topology v5e:2x4 \\
        --batch 16 --seq-len 768

Compiles `lsp_jax.tpu.programs.loss_grad_program` (next-token loss, gradient and AdamW update;
bf16 compute, float32 parameters and Adam moments, scanned and rematerialized layers,
FSDP over all chips) with libtpu's compiler and prints the memory table. Exit status 1
when it does not fit. Several --batch values compile one after the other.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lsp_jax.model import LlamaConfig  # noqa: E402
from lsp_jax.runtime import sharding  # noqa: E402
from lsp_jax.tpu import aot, flop_counts, programs, topologies  # noqa: E402
from lsp_jax.train.config import default_config  # noqa: E402

PRESETS = ("llama3_2_3b", "llama3_2_1b", "smollm2_135m", "tiny")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3_2_3b", choices=PRESETS)
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--seq-len", type=int, default=768)
    parser.add_argument("--mesh-shape", default="1,-1,1", help="data,fsdp,tensor")
    args = parser.parse_args(argv)
    model_cfg = getattr(LlamaConfig, args.model)(
        dtype=jnp.bfloat16, param_dtype=jnp.float32, scan_layers=True, remat=True
    )
    rules = default_config().mesh.rules
    mesh_shape = tuple(int(s) for s in args.mesh_shape.split(","))
    mesh = sharding.make_mesh(mesh_shape, devices=topologies.topology_devices(args.topology))
    status = 0
    for batch in args.batch:
        fn, abstract_args = programs.loss_grad_program(
            model_cfg, mesh, rules, batch=batch, seq_len=args.seq_len
        )
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            report = aot.compile_report(fn, *abstract_args, topology=args.topology)
        tokens = batch * (args.seq_len - 1)
        flops = flop_counts.llama_flops(model_cfg, tokens, context=args.seq_len - 1)
        print(f"\n{args.model}, {batch} sequences x {args.seq_len} tokens, mesh {mesh_shape}")
        print(aot.format_report(report, flops_per_iteration=flops), flush=True)
        status |= 0 if report.fits else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
