"""Rewards read from model outputs, in-graph: reward-model scores and judge scores."""

import jax
import jax.numpy as jnp

from lsp_jax.model import sequence_scores

MAX_QUALITY_SCORE = 7  # Seven binary criteria (the paper; docs/algorithm.md), so scores run 0..7.


def reward_model_scores(scores_BTC, mask_BT):
    """Scalar reward [B] of a sequence classifier: its first output at each row's last
    real token (Skywork-style reward models have one label)."""
    return sequence_scores(scores_BTC, mask_BT)[:, 0].astype(jnp.float32)


def expected_judge_score(logits_BV, digit_ids_S):
    """Σ s·p(s) over the score digits s = 0..S-1, with p renormalized over those S
    tokens (the judge's other tokens are not scores).

    Args:
      logits_BV: next-token logits right after the judge's score tag.
      digit_ids_S: token id of each digit 0..S-1.

    Returns:
      float32 [B] expected scores in [0, S-1].
    """
    # float32: the digit probabilities can be tiny and a bf16 softmax rounds them away.
    digit_logits_BS = jnp.take(logits_BV.astype(jnp.float32), digit_ids_S, axis=-1)
    probs_BS = jax.nn.softmax(digit_logits_BS, axis=-1)
    values_S = jnp.arange(digit_ids_S.shape[0], dtype=jnp.float32)
    return jnp.einsum("BS,S->B", probs_BS, values_S)


def judge_digit_mass(logits_BV, digit_ids_S):
    """The probability the judge puts on the score digits right after the score tag,
    [B] float32: how much of its next-token belief the expected score rests on (logged as
    judge/digit_mass; a prompt the model follows well gives close to 1)."""
    # float32: a softmax over the whole vocabulary (bf16 would round small masses away).
    log_probs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    digit_log_probs_BS = jnp.take(log_probs_BV, digit_ids_S, axis=-1)
    return jnp.exp(jax.nn.logsumexp(digit_log_probs_BS, axis=-1))


def parse_sampled_score(tokens_BT, mask_BT, score_patterns, *, fallback: float):
    """Reads the score that follows the last score tag in generated judgements.

    Args:
      tokens_BT: generated judgement tokens.
      mask_BT: True at generated (non-pad) tokens.
      score_patterns: pairs (tag ids, digit ids): a tag spelling (several, since BPE
        splits `<Score>` and the whitespace after it differently by context) and the
        token id of each digit 0..S-1 right after it (-1 where that digit is spelled
        otherwise); lsp_jax.game.templates.score_tag_variants.
      fallback: score given when no tag-digit pair is found.

    Returns:
      (scores_B float32, parsed_B bool).
    """
    length = tokens_BT.shape[1]
    hit_BT = jnp.zeros(tokens_BT.shape, bool)
    value_BT = jnp.zeros(tokens_BT.shape, jnp.float32)
    for tag, digit_ids in score_patterns:
        # Position t holds the digit; the tag occupies t-len(tag) .. t-1.
        after_tag_BT = jnp.ones(tokens_BT.shape, bool)
        for k, tag_id in enumerate(tag):
            shift = len(tag) - k
            shifted_BT = jnp.pad(tokens_BT, ((0, 0), (shift, 0)), constant_values=-1)[:, :length]
            after_tag_BT &= shifted_BT == tag_id
        digits_S = jnp.asarray(digit_ids, jnp.int32)
        known_S = digits_S >= 0
        is_digit_BTS = (tokens_BT[:, :, None] == digits_S[None, None, :]) & known_S[None, None, :]
        is_digit_BTS &= mask_BT[:, :, None]
        pattern_BT = after_tag_BT & is_digit_BTS.any(axis=-1)
        value_BT = jnp.where(pattern_BT, jnp.argmax(is_digit_BTS, axis=-1), value_BT)
        hit_BT |= pattern_BT
    parsed_B = hit_BT.any(axis=-1)
    last_B = jnp.argmax(jnp.where(hit_BT, jnp.arange(length)[None, :], -1), axis=-1)
    score_B = jnp.take_along_axis(value_BT, last_B[:, None], axis=1)[:, 0]
    return jnp.where(parsed_B, score_B, fallback), parsed_B
