"""The sampler against transformers' generate, full-forward log-probs, softmax frequencies
and hand-computed stop/mask bookkeeping, on a tiny random Llama (and SmolLM2 if present)."""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from lsp_jax import sampling
from lsp_jax.errors import UserError
from lsp_jax.model import Llama, LlamaConfig
from lsp_jax.sampling import SamplerConfig, jit_sample
from lsp_jax.weights import load_hf

# Prompts of different lengths (left padding is exercised); ids avoid pad 0.
PROMPTS = [[5, 17, 301, 44, 9, 120, 77], [8, 400], [33, 102, 250, 61], [90, 91, 92, 93, 94]]
PAD = 0


def left_pad(prompts, length=None):
    length = length or max(map(len, prompts))
    tokens = np.full((len(prompts), length), PAD, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, length - len(prompt) :] = prompt
    return jnp.asarray(tokens), jnp.asarray(tokens != PAD)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, params, torch model): a random tiny Llama with fairly peaked logits."""
    config = LlamaConfig.tiny()
    hf_config = transformers.LlamaConfig(**config.to_hf_config(), initializer_range=0.08)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    config, params = load_hf(folder)
    return config, jax.device_put(params), model


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(config, params, tokens_BT, mask_BT):
    return Llama(config).apply({"params": params}, tokens_BT, mask_BT=mask_BT)


def full_logits(config, params, tokens_BT, mask_BT):
    """Logits of a plain (cache-free) forward pass, float32 numpy."""
    return np.asarray(_full_logits(config, params, tokens_BT, mask_BT))


# Few distinct (sampler, shape) combinations: each one is a compilation.
GREEDY = SamplerConfig(max_new_tokens=12, greedy=True, pad_token=PAD)
NUCLEUS = SamplerConfig(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, pad_token=PAD)
GROUP = 3
NO_STOPS = np.full((len(PROMPTS) * GROUP, 2), -1, np.int32)


def hf_greedy(model, prompt, max_new_tokens, eos=None):
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = PAD
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt) :].tolist()


def run(config, params, sampler, stops_BM, *, group_size=1, seed=0, **kwargs):
    tokens_PT, mask_PT = left_pad(PROMPTS)
    return jit_sample(
        config,
        params,
        tokens_PT,
        mask_PT,
        jax.random.key(seed),
        sampler,
        group_size=group_size,
        stop_tokens_BM=stops_BM,
        **kwargs,
    )


def test_greedy_matches_transformers(tiny):
    config, params, model = tiny
    out = run(config, params, GREEDY, NO_STOPS[:4])
    for i, prompt in enumerate(PROMPTS):
        assert out.tokens_BT[i].tolist() == hf_greedy(model, prompt, 12), f"prompt {i}"
    assert out.mask_BT.all() and out.truncated_B.all()
    assert out.lengths_B.tolist() == [12] * len(PROMPTS)


def test_greedy_stops_like_transformers(tiny):
    """Stop at a token each prompt's greedy completion really emits, as transformers does."""
    config, params, model = tiny
    free = run(config, params, GREEDY, NO_STOPS[:4])
    stop = int(free.tokens_BT[0, 4])
    out = run(config, params, GREEDY, np.full((4, 2), [stop, -1], np.int32))
    for i, prompt in enumerate(PROMPTS):
        expected = hf_greedy(model, prompt, 12, eos=stop)
        length = int(out.lengths_B[i])
        assert out.tokens_BT[i, :length].tolist() == expected, f"prompt {i}"
        assert bool(out.truncated_B[i]) == (stop not in expected)
    assert int(out.lengths_B[0]) <= 5


def test_bucketed_decode_equals_unbucketed(tiny):
    config, params, _ = tiny
    outs = [
        run(config, params, NUCLEUS.replace(decode_buckets=b), NO_STOPS, group_size=GROUP, seed=3)
        for b in (NUCLEUS.decode_buckets, 1, 3)
    ]
    for out in outs[1:]:
        np.testing.assert_array_equal(out.tokens_BT, outs[0].tokens_BT)
        np.testing.assert_allclose(out.logprobs_BT, outs[0].logprobs_BT, atol=1e-5)


@pytest.mark.parametrize(
    "sampler,group", [(NUCLEUS, GROUP), (GREEDY, 1)], ids=["nucleus", "greedy"]
)
def test_logprobs_match_full_forward(tiny, sampler, group):
    """Log-probs equal log_softmax(logits / temperature) of a cache-free forward pass over
    prompt + completion; some rows stop early, so masked tails are exercised."""
    config, params, _ = tiny
    no_stops = NO_STOPS[: len(PROMPTS) * group]
    free = np.asarray(run(config, params, sampler, no_stops, group_size=group, seed=1).tokens_BT)
    stops_BM = np.full(no_stops.shape, -1, np.int32)
    stops_BM[::3, 0] = free[::3, 3]
    stops_BM[1::3, 1] = free[1::3, 7]
    out = run(config, params, sampler, stops_BM, group_size=group, seed=1)
    assert not out.mask_BT.all() and out.mask_BT[2::3].all()
    tokens_PT, mask_PT = left_pad(PROMPTS)
    seq = jnp.concatenate([jnp.repeat(tokens_PT, group, 0), out.tokens_BT], axis=1)
    seq_mask = jnp.concatenate([jnp.repeat(mask_PT, group, 0), out.mask_BT], axis=1)
    logits = full_logits(config, params, seq, seq_mask)[:, tokens_PT.shape[1] - 1 : -1]
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / sampler.temperature, axis=-1))
    expected = np.take_along_axis(logp, np.asarray(out.tokens_BT)[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        out.logprobs_BT, np.where(out.mask_BT, expected, 0.0), atol=1e-4, rtol=0
    )
    if sampler.greedy:
        np.testing.assert_array_equal(np.where(out.mask_BT, logits.argmax(-1), PAD), out.tokens_BT)


def peaked(params, scale):
    """The tiny model with its LM head scaled: a sharper next-token distribution."""
    return {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * scale}}


def kept_set(logits_V, top_k, top_p):
    """Reference top-k then top-p kept set, in numpy (float64)."""
    order = np.argsort(-logits_V, kind="stable")
    keep = order[:top_k] if top_k else order
    probs = np.exp(logits_V[keep] - logits_V[keep].max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    return set(keep[mass_before < top_p].tolist())


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 6, 1.0), (1.0, 0, 0.8)]
)
def test_first_token_frequencies_match_softmax(tiny, temperature, top_k, top_p):
    """Chi-square of 6000 first tokens against the (truncated) softmax of a full forward."""
    config, params, _ = tiny
    params = peaked(params, 3.0)
    tokens, mask = left_pad([PROMPTS[0]])
    num = 6000
    sampler = SamplerConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    out = jit_sample(config, params, tokens, mask, jax.random.key(7), sampler, group_size=num)
    logits_V = full_logits(config, params, tokens, mask)[0, -1].astype(np.float64) / temperature
    keep = np.array(sorted(kept_set(logits_V, top_k, top_p)))
    probs_V = np.zeros_like(logits_V)
    probs_V[keep] = np.exp(logits_V[keep] - logits_V[keep].max())
    probs_V /= probs_V.sum()
    counts_V = np.bincount(np.asarray(out.tokens_BT[:, 0]), minlength=len(probs_V))
    assert counts_V[probs_V == 0].sum() == 0, "a token outside the top-k/top-p set was drawn"
    # Bins with expected count >= 5 and one bin for the rest (dropped if too small).
    expected_V = probs_V * num
    big = expected_V >= 5
    assert big.sum() >= 4, "the test distribution should have several likely tokens"
    observed = np.append(counts_V[big], counts_V[~big].sum())
    expected = np.append(expected_V[big], expected_V[~big].sum())
    if expected[-1] < 5:
        observed, expected = observed[:-1], expected[:-1]
        observed = observed * (expected.sum() / observed.sum())
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize(
    "sampler", [NUCLEUS, NUCLEUS.replace(top_k=0, top_p=0.6)], ids=["topk-topp", "topp"]
)
def test_truncation_never_leaves_kept_set(tiny, sampler):
    """Every sampled token (all steps) lies in the top-k/top-p set of the full forward's
    logits at its position."""
    config, params, _ = tiny
    params = peaked(params, 2.0)
    out = run(config, params, sampler, NO_STOPS, group_size=GROUP, seed=2)
    tokens_PT, mask_PT = left_pad(PROMPTS)
    seq = jnp.concatenate([jnp.repeat(tokens_PT, GROUP, 0), out.tokens_BT], axis=1)
    seq_mask = jnp.concatenate([jnp.repeat(mask_PT, GROUP, 0), out.mask_BT], axis=1)
    logits = full_logits(config, params, seq, seq_mask)
    logits = logits[:, tokens_PT.shape[1] - 1 : -1].astype(np.float64) / sampler.temperature
    outside = [
        (b, t)
        for b in range(seq.shape[0])
        for t in range(sampler.max_new_tokens)
        if int(out.tokens_BT[b, t]) not in kept_set(logits[b, t], sampler.top_k, sampler.top_p)
    ]
    assert not outside
    assert len(set(np.asarray(out.tokens_BT).ravel().tolist())) > sampler.max_new_tokens


def test_group_prefill_equals_separate_prefills(tiny):
    """Same per-row keys => the same samples whether a prompt is prefilled once for its
    group, once per row, or alone without padding."""
    config, params, _ = tiny
    grouped = run(config, params, NUCLEUS, NO_STOPS, group_size=GROUP, seed=5)
    tokens_PT, mask_PT = left_pad(PROMPTS)
    separate = jit_sample(
        config,
        params,
        jnp.repeat(tokens_PT, GROUP, 0),
        jnp.repeat(mask_PT, GROUP, 0),
        jax.random.key(5),
        NUCLEUS,
        stop_tokens_BM=NO_STOPS,
    )
    np.testing.assert_array_equal(grouped.tokens_BT, separate.tokens_BT)
    np.testing.assert_allclose(grouped.logprobs_BT, separate.logprobs_BT, atol=1e-5)
    # Row 4 (prompt 1, sample 1) alone, unpadded, with its row id.
    alone_tokens, alone_mask = left_pad([PROMPTS[1]])
    alone = jit_sample(
        config,
        params,
        alone_tokens,
        alone_mask,
        jax.random.key(5),
        NUCLEUS,
        stop_tokens_BM=NO_STOPS[:1],
        row_ids_B=jnp.array([4]),
    )
    np.testing.assert_array_equal(alone.tokens_BT[0], grouped.tokens_BT[4])
    # Different rows of one group do differ.
    assert not np.array_equal(grouped.tokens_BT[3], grouped.tokens_BT[4])


def first_stop(row, stops):
    hits = [t for t, token in enumerate(row) if token in stops]
    return hits[0] if hits else None


def test_per_row_stop_tokens(tiny):
    """Hand-computed masks, lengths, pads and truncation flags from a no-stop run; per-row
    [P, M] stop ids are shared by each prompt's group, [B, M] ones are per row."""
    config, params, _ = tiny
    sampler = NUCLEUS.replace(stop_tokens=(509,))  # never emitted below
    free = np.asarray(run(config, params, NUCLEUS, NO_STOPS, group_size=GROUP, seed=11).tokens_BT)
    assert 509 not in free
    never = next(t for t in range(PAD + 1, 512) if t not in free)
    stops_BM = np.full(NO_STOPS.shape, -1, np.int32)
    stops_BM[0, 0] = free[0, 2]  # stops at step <= 2
    stops_BM[1] = [free[1, 6], free[1, 4]]  # either id; the earlier wins
    stops_BM[2, 1] = never  # truncated
    stops_BM[3:, 0] = free[3:, 11]  # at the last step at the latest: not truncated
    out = run(config, params, sampler, stops_BM, group_size=GROUP, seed=11)
    length = out.tokens_BT.shape[1]
    for b in range(len(stops_BM)):
        stop = first_stop(free[b].tolist(), set(stops_BM[b].tolist()))
        size = length if stop is None else stop + 1
        assert int(out.lengths_B[b]) == size
        assert out.mask_BT[b].tolist() == [t < size for t in range(length)]
        assert out.tokens_BT[b].tolist() == free[b, :size].tolist() + [PAD] * (length - size)
        assert bool(out.truncated_B[b]) == (stop is None)
        assert np.all(np.asarray(out.logprobs_BT[b, size:]) == 0.0)
    assert out.truncated_B[:3].tolist() == [False, False, True]
    assert not out.truncated_B[3:].any()


def test_loop_exits_when_every_row_stopped(tiny):
    """With every row stopping by step 1, the decode loop runs once: the returned cache's
    write index counts the fed tokens."""
    config, params, _ = tiny
    free = run(config, params, GREEDY, NO_STOPS[:4])
    out = run(config, params, GREEDY, np.asarray(free.tokens_BT[:, :2]), return_cache=True)
    assert np.all(np.asarray(out.lengths_B) <= 2)
    prompt_len = max(map(len, PROMPTS))
    assert int(out.cache.end) == prompt_len + int(out.lengths_B.max()) - 1
    assert out.cache.k_LBSKH.shape[2] == prompt_len + GREEDY.max_new_tokens - 1
    assert free.cache is None


def test_one_compilation_per_shape(tiny):
    config, params, _ = tiny
    traces = []

    def counted(config, params, tokens, mask, rng, sampler, *, group_size, stop_tokens_BM):
        traces.append(1)
        return sampling.sample(
            config, params, tokens, mask, rng, sampler,
            group_size=group_size, stop_tokens_BM=stop_tokens_BM,
        )  # fmt: skip

    fn = jax.jit(counted, static_argnames=("config", "sampler", "group_size"))
    for seed in range(3):
        tokens, mask = left_pad([[p + seed for p in prompt] for prompt in PROMPTS])
        # A fresh but equal sampler config each call: hashed by value, no retrace.
        sampler = SamplerConfig(max_new_tokens=4, top_k=10, stop_tokens=[3], decode_buckets=1)
        out = fn(config, params, tokens, mask, jax.random.key(seed), sampler, group_size=2,
                 stop_tokens_BM=jnp.full((8, 1), 4 + seed))  # fmt: skip
        out.tokens_BT.block_until_ready()
    assert len(traces) == 1
    run(config, params, GREEDY, NO_STOPS[:4])
    before = jit_sample._cache_size()
    for seed in range(3):
        run(config, params, GREEDY.replace(), NO_STOPS[:4] + seed, seed=seed)
    assert jit_sample._cache_size() == before


def test_decode_segments_cover_all_steps():
    for max_new in (1, 2, 5, 64, 100):
        for buckets in (1, 3, 4, 200):
            ends = sampling.decode_segments(max_new, buckets)
            assert ends == sorted(set(ends))
            assert (ends[-1] if ends else 0) == max_new - 1
            assert len(ends) <= buckets


def test_sampler_config_errors():
    with pytest.raises(UserError, match="greedy=True"):
        SamplerConfig(max_new_tokens=4, temperature=0.0)
    with pytest.raises(UserError, match="top_p"):
        SamplerConfig(max_new_tokens=4, top_p=0.0)
    assert dataclasses.replace(SamplerConfig(4), top_k=3) == SamplerConfig(4, top_k=3)
    assert hash(SamplerConfig(4, stop_tokens=[2, 3])) == hash(SamplerConfig(4, stop_tokens=(2, 3)))


CHAT_QUESTIONS = (
    "Hi!",
    "What is the capital of France? Answer in one word.",
    "Write a haiku about autumn leaves falling in a quiet park at dusk.",
    "List three prime numbers.",
)


@contextlib.contextmanager
def torch_threads(num):
    """One torch thread: on a busy 2-core machine two spinning OpenMP threads make
    transformers' decoding several times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_smollm2_greedy_matches_transformers():
    """SmolLM2-135M-Instruct (the package's GGUF): a left-padded batch of chat prompts
    generates what transformers' greedy generate gives for each prompt alone."""
    import smollm2

    from lsp_jax.weights import stack_layers

    model = smollm2.load()
    prompts = [model.prompt_ids([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]
    assert len(set(map(len, prompts))) == len(prompts)
    length = max(map(len, prompts))
    tokens = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, prompt in enumerate(prompts):
        tokens[i, length - len(prompt) :] = prompt
        mask[i, length - len(prompt) :] = True
    stops = model.tokenizer.eos_ids
    sampler = SamplerConfig(max_new_tokens=48, greedy=True, stop_tokens=stops)
    # The scanned layout compiles in seconds (an unrolled 30-layer model takes minutes).
    config = model.config.replace(scan_layers=True)
    out = jit_sample(config, stack_layers(model.params), tokens, mask, jax.random.key(0), sampler)
    reference = smollm2.reference_model()
    reference.generation_config.pad_token_id = model.tokenizer.pad_id
    for i, prompt in enumerate(prompts):
        with torch.no_grad(), torch_threads(1):
            expected = reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=48,
                eos_token_id=list(stops),
            )[0, len(prompt) :].tolist()
        got = out.tokens_BT[i, : int(out.lengths_B[i])].tolist()
        assert got == expected, f"prompt {i}: {got} != {expected}"
        assert bool(out.truncated_B[i]) == (expected[-1] not in stops)
    assert not out.truncated_B.all(), "some prompt should end with a stop token"
