"""Rewards read from model outputs, in-graph: reward-model scores and judge scores."""

import jax
import jax.numpy as jnp

from lsp_jax.model import sequence_scores

MAX_QUALITY_SCORE = 7  # Seven binary criteria (LSP.md), so scores run 0..7.


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


def parse_sampled_score(tokens_BT, mask_BT, tag_ids_list, digit_ids_S, *, fallback: float):
    """Reads the digit that follows the last score tag in generated judgements.

    Args:
      tokens_BT: generated judgement tokens.
      mask_BT: True at generated (non-pad) tokens.
      tag_ids_list: token-id tuples that spell the score tag (several, since BPE may
        split `<Score>` differently after a space or newline).
      digit_ids_S: token id of each digit 0..S-1.
      fallback: score given when no tag-digit pair is found.

    Returns:
      (scores_B float32, parsed_B bool).
    """
    length = tokens_BT.shape[1]
    is_digit_BTS = (tokens_BT[:, :, None] == digit_ids_S[None, None, :]) & mask_BT[:, :, None]
    digit_value_BT = jnp.argmax(is_digit_BTS, axis=-1).astype(jnp.float32)
    after_tag_BT = jnp.zeros(tokens_BT.shape, bool)
    for tag in tag_ids_list:
        matches_BT = jnp.ones(tokens_BT.shape, bool)
        for k, tag_id in enumerate(tag):
            # Position t holds the digit; the tag occupies t-len(tag) .. t-1.
            shift = len(tag) - k
            shifted_BT = jnp.pad(tokens_BT, ((0, 0), (shift, 0)), constant_values=-1)[:, :length]
            matches_BT &= shifted_BT == tag_id
        after_tag_BT |= matches_BT
    hit_BT = after_tag_BT & is_digit_BTS.any(axis=-1)
    parsed_B = hit_BT.any(axis=-1)
    last_B = jnp.argmax(jnp.where(hit_BT, jnp.arange(length)[None, :], -1), axis=-1)
    score_B = jnp.take_along_axis(digit_value_BT, last_B[:, None], axis=1)[:, 0]
    return jnp.where(parsed_B, score_B, fallback), parsed_B
