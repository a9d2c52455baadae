"""Pieces of the training step: shared-prefix forwards against full forwards and
against transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsp_jax.game.splice import splice_segments
from lsp_jax.model import Llama
from lsp_jax.rl import token_logprobs
from lsp_jax.train.forward import completion_logprobs, forward_with_prefix, groups_logprobs
from lsp_jax.weights import load_hf

PAD = 0


@dataclasses.dataclass(frozen=True)
class _Cfg:  # The two StepConfig fields completion_logprobs reads.
    logprob_chunk: int
    solver: object


@dataclasses.dataclass(frozen=True)
class _Sampler:
    temperature: float


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests import hf_models

    root = tmp_path_factory.mktemp("step_models")
    lm, rm = hf_models.causal_lm(seed=5), hf_models.classifier(seed=6)
    lm.save_pretrained(root / "lm")
    rm.save_pretrained(root / "rm")
    return hf_models, lm, rm, load_hf(root / "lm"), load_hf(root / "rm")


def prompts_and_completions(rng, group):
    lengths = np.array([3, 5])
    prompt = np.zeros((2, 5), np.int64)
    prompt_mask = np.arange(5)[None, :] >= (5 - lengths)[:, None]  # Left-padded.
    prompt[prompt_mask] = rng.integers(3, 90, prompt_mask.sum())
    completions = rng.integers(3, 90, (2 * group, 4))
    completion_mask = np.ones((2 * group, 4), bool)
    completion_mask[1, 2:] = False  # Stopped after two tokens.
    completions[~completion_mask] = PAD
    return prompt, prompt_mask, completions, completion_mask


@pytest.mark.parametrize("chunk", [0, 3])
def test_completion_logprobs_equal_a_full_forward(models, chunk):
    _, _, _, (config, params), _ = models
    rng = np.random.default_rng(0)
    group, temperature = 3, 0.7
    prompt, prompt_mask, tokens, mask = prompts_and_completions(rng, group)
    cfg = _Cfg(logprob_chunk=chunk, solver=_Sampler(temperature))
    ours = completion_logprobs(config, params, prompt, prompt_mask, tokens, mask, cfg)
    # Reference: every row's prompt + completion through one plain forward pass.
    full = np.concatenate([np.repeat(prompt, group, 0), tokens], axis=1)
    full_mask = np.concatenate([np.repeat(prompt_mask, group, 0), mask], axis=1)
    logits = Llama(config).apply({"params": params}, jnp.asarray(full), mask_BT=full_mask)
    want = token_logprobs(logits[:, 4:-1], jnp.asarray(tokens), temperature=temperature)
    np.testing.assert_allclose(np.asarray(ours)[mask], np.asarray(want)[mask], atol=1e-5)


def test_gradients_flow_through_the_shared_prefix(models):
    _, _, _, (config, params), _ = models
    prompt, prompt_mask, tokens, mask = prompts_and_completions(np.random.default_rng(1), 2)
    cfg = _Cfg(logprob_chunk=0, solver=_Sampler(1.0))

    def total(p, shared):
        if shared:
            logp = completion_logprobs(config, p, prompt, prompt_mask, tokens, mask, cfg)
        else:
            full = np.concatenate([np.repeat(prompt, 2, 0), tokens], axis=1)
            full_mask = np.concatenate([np.repeat(prompt_mask, 2, 0), mask], axis=1)
            logits = Llama(config).apply({"params": p}, jnp.asarray(full), mask_BT=full_mask)
            logp = token_logprobs(logits[:, 4:-1], jnp.asarray(tokens))
        return jnp.sum(jnp.where(mask, logp, 0.0))

    grad = jax.jit(jax.grad(total), static_argnums=1)
    a, b = grad(params, True), grad(params, False)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)


def test_reward_model_score_after_a_shared_prefix_matches_transformers(models):
    helpers, _, rm, _, (config, params) = models
    rng = np.random.default_rng(2)
    prefix = rng.integers(3, 90, (1, 4))
    segments = [
        (rng.integers(3, 90, (3, 5)), np.array([5, 2, 0])),
        (rng.integers(3, 90, (1, 2)), np.array([2])),
        (rng.integers(3, 90, (3, 4)), np.array([1, 4, 3])),
    ]
    tokens, mask = (np.asarray(x) for x in splice_segments(segments, pad_id=PAD))
    last = forward_with_prefix(config, params, prefix, np.ones(prefix.shape, bool), tokens, mask)[1]
    ours = np.asarray(last @ params["score"]["kernel"])[:, 0]
    # transformers sees prefix, then the row's padding, then its tokens.
    full = np.concatenate([np.repeat(prefix, 3, 0), tokens], axis=1)
    full_mask = np.concatenate([np.ones((3, 4), bool), mask], axis=1)
    want = helpers.hf_forward(rm, full, full_mask)[:, 0]
    np.testing.assert_allclose(ours, want, atol=1e-4)


def test_two_groups_in_one_pass_equal_separate_passes(models, tmp_path):
    """The loss's one pass over both roles (groups_logprobs) gives each role's log-probs
    and the summed gradient of separate passes, in scanned, rematerialized layers (the CPU
    default's layout; the tests above use unscanned ones)."""
    _, lm, _, _, _ = models
    lm.save_pretrained(tmp_path / "lm")
    config, params = load_hf(tmp_path / "lm", scan_layers=True)
    config = config.replace(remat=True)
    rng = np.random.default_rng(3)
    first = prompts_and_completions(rng, 2)
    prompt, prompt_mask, tokens, mask = prompts_and_completions(rng, 3)
    second = (prompt[:1], prompt_mask[:1], tokens[:3, :3], mask[:3, :3])  # Other shapes.
    cfg = _Cfg(logprob_chunk=0, solver=_Sampler(0.8))

    def together(p):
        return groups_logprobs(config, p, [first, second], cfg)

    def apart(p):
        return [completion_logprobs(config, p, *rows, cfg) for rows in (first, second)]

    def total(p, fn):
        a, b = fn(p)
        return jnp.sum(jnp.where(first[3], a, 0.0)) + 0.5 * jnp.sum(jnp.where(second[3], b, 0.0))

    for ours, want, rows in zip(jax.jit(together)(params), jax.jit(apart)(params), (first, second)):
        assert ours.shape == rows[2].shape
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=1e-5)
    grad = jax.jit(jax.grad(total), static_argnums=1)
    for x, y in zip(jax.tree.leaves(grad(params, together)), jax.tree.leaves(grad(params, apart))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
