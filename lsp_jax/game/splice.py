"""In-graph packing of variable-length token segments into left-padded rows."""

import jax.numpy as jnp


def splice_segments(segments, *, pad_id: int):
    """Concatenates each row's segments, dropping their padding, then left-pads.

    Every segment is a pair (tokens_BL, lengths_B): the first `lengths_B[b]` tokens of
    row b are real (a right-padded segment). A fixed template piece is a segment with
    one row broadcast to B. The output width is the sum of the segment widths, so it
    never truncates.

    Args:
      segments: sequence of (tokens_BL, lengths_B) with a common batch size B (a
        template piece may have batch 1).
      pad_id: token written into padding.

    Returns:
      tokens_BW and mask_BW (True at real tokens), real tokens flush right.
    """
    batch = max(tokens.shape[0] for tokens, _ in segments)
    tokens_list, lengths_list = [], []
    for tokens_BL, lengths_B in segments:
        tokens_list.append(jnp.broadcast_to(tokens_BL, (batch, tokens_BL.shape[1])))
        lengths_list.append(jnp.broadcast_to(jnp.asarray(lengths_B, jnp.int32), (batch,)))
    widths = [t.shape[1] for t in tokens_list]
    width = sum(widths)
    buffer_BW = jnp.concatenate(tokens_list, axis=1)
    lengths_BK = jnp.stack(lengths_list, axis=1)
    # Where each segment starts in the packed row, and in the concatenated buffer.
    packed_start_BK = jnp.cumsum(lengths_BK, axis=1) - lengths_BK
    buffer_start_K = jnp.cumsum(jnp.asarray([0] + widths[:-1], jnp.int32))
    total_B = lengths_BK.sum(axis=1)
    # Logical index j of output column p in the packed (unpadded) row.
    j_BW = jnp.arange(width)[None, :] - (width - total_B)[:, None]
    mask_BW = j_BW >= 0
    # The segment holding packed index j: the last one starting at or before j.
    in_segment_BWK = (packed_start_BK[:, None, :] <= j_BW[:, :, None]) & (
        lengths_BK[:, None, :] > 0
    )
    segment_BW = jnp.max(jnp.where(in_segment_BWK, jnp.arange(len(widths)), -1), axis=-1)
    segment_BW = jnp.maximum(segment_BW, 0)
    offset_BW = j_BW - jnp.take_along_axis(packed_start_BK, segment_BW, axis=1)
    source_BW = buffer_start_K[segment_BW] + offset_BW
    source_BW = jnp.clip(source_BW, 0, width - 1)
    tokens_BW = jnp.take_along_axis(buffer_BW, source_BW, axis=1)
    return jnp.where(mask_BW, tokens_BW, pad_id), mask_BW


def content_lengths(lengths_B, stopped_B):
    """Lengths of generated segments without their stop token (the next template
    piece supplies its own end-of-turn token)."""
    return lengths_B - stopped_B.astype(lengths_B.dtype)
