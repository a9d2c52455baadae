"""Rewards read in-graph: reward-model scores and judge scores against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsp_jax.game import rewards
from lsp_jax.game.splice import splice_segments
from lsp_jax.model import Llama
from lsp_jax.weights import load_hf

PAD = 0


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from tests import hf_models

    root = tmp_path_factory.mktemp("reward_models")
    rm = hf_models.classifier(seed=3)
    rm.save_pretrained(root / "rm")
    lm = hf_models.causal_lm(seed=4)
    lm.save_pretrained(root / "lm")
    return hf_models, rm, lm, root


def judged_pairs(seed=0):
    """Spliced [prefix, query, middle, answer, suffix] rows of random lengths."""
    rng = np.random.default_rng(seed)
    batch = 4
    segments = [
        (rng.integers(3, 90, (1, 3)), np.array([3])),
        (rng.integers(3, 90, (batch, 6)), np.array([6, 2, 0, 4])),
        (rng.integers(3, 90, (1, 2)), np.array([2])),
        (rng.integers(3, 90, (batch, 5)), np.array([1, 5, 3, 0])),
        (rng.integers(3, 90, (1, 2)), np.array([2])),
    ]
    tokens, mask = splice_segments(segments, pad_id=PAD)
    return np.asarray(tokens), np.asarray(mask)


def test_reward_model_scores_match_transformers(hf_models):
    helpers, rm, _, root = hf_models
    config, params = load_hf(root / "rm")
    tokens, mask = judged_pairs()
    scores_BTC = Llama(config).apply({"params": params}, jnp.asarray(tokens), mask_BT=mask)
    ours = np.asarray(rewards.reward_model_scores(scores_BTC, mask))
    want = helpers.hf_forward(rm, tokens, mask)[:, 0]  # transformers pools the last token.
    np.testing.assert_allclose(ours, want, atol=1e-4)
    assert np.ptp(want) > 1e-2  # The check would be vacuous on constant scores.


def test_expected_judge_score_matches_transformers_logits(hf_models):
    helpers, _, lm, root = hf_models
    config, params = load_hf(root / "lm")
    tokens, mask = judged_pairs(seed=1)
    digit_ids = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    logits_BTV = Llama(config).apply({"params": params}, jnp.asarray(tokens), mask_BT=mask)
    ours = np.asarray(rewards.expected_judge_score(logits_BTV[:, -1], jnp.asarray(digit_ids)))
    hf_logits = helpers.hf_forward(lm, tokens, mask)[:, -1].astype(np.float64)
    digit_logits = hf_logits[:, digit_ids]
    probs = np.exp(digit_logits - digit_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = probs @ np.arange(8)
    np.testing.assert_allclose(ours, want, atol=1e-4)


DIGITS = np.arange(50, 58)  # Token ids of "0".."7" in these hand-made sequences.
TAG_A = (7, 8, 9)  # e.g. "<", "Score", ">"
TAG_B = (6, 9)  # e.g. " <Score", ">"
PATTERNS = ((TAG_A, tuple(DIGITS)), (TAG_B, tuple(DIGITS)))


def test_sampled_scores_read_the_digit_after_the_last_tag():
    d = DIGITS
    rows = [
        [1, 7, 8, 9, d[5], 2, 0, 0],  # tag A then 5
        [7, 8, 9, d[2], 3, 6, 9, d[6]],  # two tags: the last (tag B, 6) counts
        [1, 2, 3, d[4], 4, 5, 6, 1],  # a digit with no tag before it
        [7, 8, 9, 3, d[1], 0, 0, 0],  # tag followed by a non-digit
        [1, 6, 9, d[7], 0, 0, 0, 0],  # tag B then 7, but the digit is masked out
        [7, 8, 9, d[0], 0, 0, 0, 0],  # score 0 is a valid score
    ]
    mask = np.ones((6, 8), bool)
    mask[4, 3:] = False
    scores, parsed = rewards.parse_sampled_score(
        jnp.asarray(rows), jnp.asarray(mask), PATTERNS, fallback=-1.0
    )
    np.testing.assert_array_equal(np.asarray(parsed), [True, True, False, False, False, True])
    np.testing.assert_array_equal(np.asarray(scores), [5, 6, -1, -1, -1, 0])


def test_sampled_parse_compiles_inside_jit():
    fn = jax.jit(lambda t, m: rewards.parse_sampled_score(t, m, PATTERNS[:1], fallback=3.5))
    tokens = jnp.asarray([[7, 8, 9, DIGITS[4]], [1, 1, 1, 1]])
    scores, parsed = fn(tokens, jnp.ones((2, 4), bool))
    np.testing.assert_array_equal(np.asarray(scores), [4.0, 3.5])
    assert float(jnp.mean(1.0 - parsed)) == 0.5
