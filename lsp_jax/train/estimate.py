"""Stand-ins for what the step needs besides weights, for compiling without them
(`lsp-jax aot`): architectures, token ids, and token templates of realistic length."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from lsp_jax.errors import UserError
from lsp_jax.game import prompts as prompt_texts
from lsp_jax.game.templates import GameTemplates, piece
from lsp_jax.model import Llama, LlamaConfig

GRPO_PROMPTS = 64  # Rows of the abstract prompt set (only its row width matters).
CHARS_PER_TOKEN = 4  # English text in Llama-3's BPE, roughly.
TURN_TOKENS = 5  # Header and end-of-turn tokens around each chat turn.
SYSTEM_TOKENS = 30  # Llama-3.2's date block, or ChatML's default system prompt.
SPECIAL_TOKENS = 256  # Llama-3's special tokens (neutralized in generated text).


def architecture(source, preset, *, num_labels=0, **overrides) -> LlamaConfig:
    """The LlamaConfig of `source` (read from its config, no weights), else of `preset`."""
    if source:
        from lsp_jax.weights import sources

        resolved = sources.resolve(source)
        if resolved.kind == sources.HF:
            hf = json.loads((Path(resolved.path) / "config.json").read_text())
            return LlamaConfig.from_hf_config(hf, **overrides)
        if resolved.kind == sources.GGUF:
            from lsp_jax.weights.gguf import read_gguf
            from lsp_jax.weights.gguf_config import config_from_gguf

            return config_from_gguf(read_gguf(resolved.path), **overrides)
        return sources.load_model(source, **overrides)[0]
    if not preset:
        raise UserError(
            "Compiling without weights needs an architecture: pass a model source "
            "(--config.model.source=PATH) or a preset (--config.model.preset=llama3_2_3b; "
            "for the reward model --config.reward.preset=llama3_2_3b)."
        )
    factory = getattr(LlamaConfig, preset, None)
    if factory is None or not callable(factory) or preset.startswith("_"):
        names = "llama3_2_1b, llama3_2_3b, smollm2_135m, tiny"
        raise UserError(f"Unknown model preset {preset!r}; choose one of {names}.")
    return factory(num_labels=num_labels, **overrides)


@dataclasses.dataclass(frozen=True)
class TokenIds:
    stop_ids: tuple[int, ...]
    pad_id: int


def tokenizer_ids(config: LlamaConfig) -> TokenIds:
    stop = tuple(config.eos_token_ids) or (0,)
    pad = config.pad_token_id if config.pad_token_id is not None else stop[0]
    return TokenIds(stop_ids=stop, pad_id=pad)


def _tokens(text: str, extra: int = 0) -> int:
    return math.ceil(len(text.encode("utf-8")) / CHARS_PER_TOKEN) + extra


def templates(config, texts) -> GameTemplates:
    """Templates with the lengths the real ones would have (ids are placeholders)."""
    challenger = prompt_texts.fill(
        texts.challenger_prompt, task=texts.task, template=texts.template
    )
    before, rest = texts.judge_prompt.split("{instruction}")
    between, after = rest.split("{response}")
    user_prefix = SYSTEM_TOKENS + TURN_TOKENS
    zeros = lambda n: piece(np.zeros(n, np.int32))
    return GameTemplates(
        challenger_prompt=np.zeros(user_prefix + _tokens(challenger, TURN_TOKENS), np.int32),
        user_prefix=zeros(user_prefix),
        user_suffix=zeros(TURN_TOKENS),
        judge_prefix=zeros(user_prefix + _tokens(before)),
        judge_middle=zeros(_tokens(between)),
        judge_suffix=zeros(_tokens(after) + TURN_TOKENS + 3),
        rm_prefix=zeros(user_prefix),
        rm_middle=zeros(2 * TURN_TOKENS),
        rm_suffix=zeros(TURN_TOKENS),
        digit_ids=np.arange(len(texts.score_tokens), dtype=np.int32),
        special_ids=np.arange(SPECIAL_TOKENS, dtype=np.int32),
        neutral_id=np.asarray(0, np.int32),
        score_tags=(((1, 2, 3), tuple(range(len(texts.score_tokens)))),),
    )


def abstract_params(config: LlamaConfig):
    """Parameter shapes and dtypes, without memory (and without logical boxes)."""
    init = lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return meta.unbox(jax.eval_shape(init)["params"])
