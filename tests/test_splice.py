"""splice_segments against a host-side reference packing."""

import jax
import numpy as np
import pytest

from lsp_jax.game.splice import content_lengths, splice_segments

PAD = -1


def reference_pack(segments, batch):
    rows = []
    for b in range(batch):
        row = []
        for tokens, lengths in segments:
            tokens = np.broadcast_to(tokens, (batch, tokens.shape[1]))
            lengths = np.broadcast_to(lengths, (batch,))
            row.extend(tokens[b, : lengths[b]].tolist())
        rows.append(row)
    width = sum(t.shape[1] for t, _ in segments)
    out = np.full((batch, width), PAD)
    mask = np.zeros((batch, width), bool)
    for b, row in enumerate(rows):
        if row:
            out[b, width - len(row) :] = row
            mask[b, width - len(row) :] = True
    return out, mask


@pytest.fixture(scope="module")
def splice_fn():
    return jax.jit(splice_segments, static_argnames="pad_id")


@pytest.mark.parametrize("seed", range(6))
def test_random_segments_match_reference(splice_fn, seed):
    rng = np.random.default_rng(seed)
    batch = 5
    prefix = rng.integers(100, 200, size=(1, 4))
    query = rng.integers(200, 300, size=(batch, 7))
    middle = rng.integers(300, 400, size=(1, 3))
    answer = rng.integers(400, 500, size=(batch, 6))
    # Lengths include 0 (empty generation) and the full width (hit the bound).
    query_len = rng.integers(0, 8, size=batch)
    query_len[0], query_len[1] = 0, 7
    answer_len = rng.integers(0, 7, size=batch)
    answer_len[2], answer_len[3] = 6, 0
    segments = [
        (prefix, np.array([4])),
        (query, query_len),
        (middle, np.array([3])),
        (answer, answer_len),
    ]
    tokens, mask = splice_fn(segments, pad_id=PAD)
    want_tokens, want_mask = reference_pack(segments, batch)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)


def test_all_segments_empty_gives_all_padding(splice_fn):
    segments = [(np.zeros((2, 3), int), np.zeros(2, int)), (np.ones((2, 2), int), np.zeros(2, int))]
    tokens, mask = splice_fn(segments, pad_id=PAD)
    assert not np.asarray(mask).any()
    assert (np.asarray(tokens) == PAD).all()


def test_content_lengths_drop_the_stop_token():
    lengths = np.array([5, 3, 8])
    stopped = np.array([True, False, True])
    np.testing.assert_array_equal(np.asarray(content_lengths(lengths, stopped)), [4, 3, 7])
