"""The self-play game: prompts as token templates, in-graph splicing, rewards, advantages."""

from lsp_jax.game.advantages import advantages, check_group_size, check_mode, group_stats
from lsp_jax.game.splice import content_lengths, splice_segments

__all__ = [
    "advantages",
    "check_group_size",
    "check_mode",
    "content_lengths",
    "group_stats",
    "splice_segments",
]
