"""Where a sampler call's time goes, op by op: one traced `jit_sample` call, grouped by
the source of each XLA op (the model code's name scopes, layer numbers folded).

The SmolLM2-135M architecture with random float32 weights (timing does not depend on
the values: greedy decoding of exactly `--new-tokens` tokens), 32-token prompts. XLA:CPU
emits one trace event per op when run with `--xla_cpu_enable_xprof_traceme=true` (set
here); tracing slows small ops down, so read the shares, not the absolute times, and
time the sampler itself with benchmarks/sampling.py.

    python benchmarks/decode_profile.py [--batch 32] [--new-tokens 64] [--top 25]
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

PROMPT_LENGTH = 32


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-buckets", type=int, default=4)
    parser.add_argument("--top", type=int, default=25, help="Rows of the table.")
    return parser.parse_args()


def op_sources(hlo_text: str) -> dict[str, str]:
    """Each instruction's name -> its source (metadata op_name), scopes normalized: the
    layer index and the decode loop's length folded, the jit wrapper dropped."""
    sources = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
        if match:
            name = re.sub(r"layers_\d+", "layers_N", match.group(2))
            name = re.sub(r"decode_steps_\d+", "decode", name)
            sources[match.group(1)] = re.sub(r"^jit\([^)]*\)/", "", name)
    return sources


def traced_op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """(total microseconds, executions) per op name in the perfetto trace under
    `trace_dir`."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals, runs = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0)
            runs[event["name"]] += 1
    return totals, runs


def main():
    args = parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.linen import meta

    from lsp_jax.model import Llama, LlamaConfig
    from lsp_jax.sampling import SamplerConfig, jit_sample

    config = LlamaConfig.smollm2_135m(dtype=jnp.float32, param_dtype=jnp.float32)
    init = jax.jit(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    params = meta.unbox(init())["params"]
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, PROMPT_LENGTH))
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.ones(tokens.shape, bool)
    sampler = SamplerConfig(
        max_new_tokens=args.new_tokens, greedy=True, decode_buckets=args.decode_buckets
    )
    key = jax.random.key(1)
    compiled = jit_sample.lower(config, params, tokens, mask, key, sampler).compile()
    jax.block_until_ready(compiled(params, tokens, mask, key))  # Warm-up.
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens, mask, key))
    plain_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens, mask, key))
            traced_s = time.perf_counter() - start
        times, runs = traced_op_times(trace_dir)

    sources = op_sources(compiled.as_text())
    by_source, counts = collections.Counter(), collections.Counter()
    for op, micros in times.items():
        if op in sources:
            by_source[sources[op]] += micros
            counts[sources[op]] += runs[op]
    total = sum(by_source.values())
    print(
        f"SmolLM2-135M architecture, random float32 weights: batch {args.batch}, prompt "
        f"{PROMPT_LENGTH}, {args.new_tokens} greedy tokens, decode_buckets "
        f"{args.decode_buckets}, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"cpus {os.cpu_count()}"
    )
    print(
        f"call {plain_s:.2f} s untraced, {traced_s:.2f} s traced; "
        f"{total / 1e6:.2f} s attributed to {len(by_source)} op sources"
    )
    print(f"{'share':>6} {'traced ms':>10} {'runs':>6}  source")
    for source, micros in by_source.most_common(args.top):
        share = micros / total
        print(f"{share:>6.1%} {micros / 1e3:>10.1f} {counts[source]:>6}  {source}")


if __name__ == "__main__":
    main()
