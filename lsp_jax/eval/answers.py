"""Answers of a model to a prompt set, and the batching they and the judges share.

Generation uses the jitted sampler (temperature 0.01 as in the paper's evaluation; 0 means
greedy) on batches of chat-formatted prompts, sorted by length, left-padded to a few bucket
lengths so that only a handful of shapes compile. Every row is seeded by its prompt's index,
so an answer does not depend on batching, and two runs of the same model agree.
"""

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lsp_jax.errors import UserError
from lsp_jax.model import LlamaConfig
from lsp_jax.sampling import SamplerConfig, jit_sample

DEFAULT_TEMPERATURE = 0.01  # The paper samples evaluation answers at 0.01.
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 8
MIN_BUCKET = 16


@dataclasses.dataclass
class EvalModel:
    """A loaded model with its chat template (and through it, its tokenizer)."""

    name: str
    config: LlamaConfig
    params: Any
    chat: Any  # lsp_jax.weights.chat.ChatTemplate

    @property
    def tokenizer(self):
        return self.chat.tokenizer


@dataclasses.dataclass
class Answers:
    """Generated answers, aligned with the prompts.

    texts: decoded answers (special tokens and the stop token removed).
    token_ids: the answer ids without the stop token.
    stopped: True where the model ended its answer (False: cut at max_new_tokens).
    """

    texts: list[str]
    token_ids: list[list[int]]
    stopped: list[bool]


def load_eval_model(source, *, dtype=None, scan_layers=True, name=None) -> EvalModel:
    """Loads weights, tokenizer and chat template of any model source.

    scan_layers (default on) compiles the layers once as a loop: for SmolLM2 on CPU this
    cuts the sampler's compile time from about 90 s to about 12 s per prompt bucket, at
    some cost per decode step (the unrolled layout is the faster one for long runs).
    """
    from lsp_jax.weights import sources

    config, params = sources.load_model(source, dtype=dtype, scan_layers=scan_layers)
    chat = sources.load_chat_template(source)
    return EvalModel(name or source_name(source), config, params, chat)


def source_name(source) -> str:
    """A short display name of a model source (its file or folder name)."""
    text = os.fspath(source).rstrip("/")
    return os.path.basename(text) or text


class ModelCache:
    """Loads each source once (a model, its baseline and its judge are often the same)."""

    def __init__(self, **options):
        self.options = options
        self.models = {}

    def get(self, source) -> EvalModel:
        key = os.fspath(source)
        if key not in self.models:
            self.models[key] = load_eval_model(source, **self.options)
        return self.models[key]


def bucket_length(length: int, *, minimum: int = MIN_BUCKET) -> int:
    """The smallest of minimum, 2^k and 3·2^(k-1) that is >= length (padding waste < 1/3)."""
    bucket = minimum
    while bucket < length:
        power = 1 << (bucket.bit_length() - 1)
        bucket = power * 3 // 2 if bucket == power and power >= 2 else power * 2
    return bucket


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int):
    """Left-pads token lists into (tokens_BT int32, mask_BT bool) numpy arrays."""
    tokens_BT = np.full((len(rows), width), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), width), bool)
    for b, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"A row of {len(row)} tokens does not fit in width {width}.")
        if len(row):
            tokens_BT[b, width - len(row) :] = row
            mask_BT[b, width - len(row) :] = True
    return tokens_BT, mask_BT


def length_batches(rows: Sequence[Sequence[int]], batch_size: int):
    """Groups row indices into batches of similar length, longest first.

    Returns:
      list of (indices, width): up to batch_size indices and their bucket length.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; it must be at least 1.")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batches.append((indices, bucket_length(max(len(rows[i]) for i in indices))))
    return batches


def _full_batch(indices, batch_size):
    """Indices filled up to batch_size with copies of the first (one shape per bucket)."""
    return list(indices) + [indices[0]] * (batch_size - len(indices))


def _progress(iterable, *, enabled, desc, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", dynamic_ncols=True)


def prompt_ids(chat, instruction: str) -> list[int]:
    """Ids of one user turn and the assistant header, in the model's chat template."""
    return chat.render([{"role": "user", "content": instruction}], add_generation_prompt=True)


def stop_ids(chat) -> tuple[int, ...]:
    """The tokenizer's stop ids and the template's end-of-turn id."""
    return tuple(dict.fromkeys([*chat.tokenizer.stop_ids, chat.end_of_turn_id]))


def pad_id(tokenizer) -> int:
    return 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)


def sampler_config(chat, *, max_new_tokens: int, temperature: float) -> SamplerConfig:
    """Sampler options for evaluation; temperature 0 means greedy decoding."""
    if temperature < 0:
        raise UserError(f"temperature={temperature}; use a value >= 0 (0 = greedy).")
    return SamplerConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature if temperature > 0 else 1.0,
        greedy=temperature == 0,
        stop_tokens=stop_ids(chat),
        pad_token=pad_id(chat.tokenizer),
    )


def prompt_texts(prompts) -> list[str]:
    return [getattr(p, "text", p) for p in prompts]


def _check_context(config, width, max_new_tokens):
    limit = config.max_position_embeddings
    if width + max_new_tokens > limit:
        raise UserError(
            f"A prompt of up to {width} tokens plus max_new_tokens={max_new_tokens} exceeds "
            f"the model's context of {limit} tokens; lower --max-new-tokens or shorten the "
            "prompts."
        )


def sample_answers(
    config: LlamaConfig,
    params,
    chat,
    prompts,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
) -> Answers:
    """Answers every prompt (strings or data.Prompt) once; see `Answers`."""
    rows = [prompt_ids(chat, text) for text in prompt_texts(prompts)]
    sampler = sampler_config(chat, max_new_tokens=max_new_tokens, temperature=temperature)
    rng = jax.random.key(seed)
    texts, token_ids, stopped = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    batches = length_batches(rows, batch_size)
    for indices, width in _progress(batches, enabled=progress, desc=desc):
        _check_context(config, width, max_new_tokens)
        full = _full_batch(indices, batch_size)
        tokens_BT, mask_BT = left_pad([rows[i] for i in full], width, sampler.pad_token)
        out = jit_sample(
            config, params, tokens_BT, mask_BT, rng, sampler, row_ids_B=np.asarray(full, np.int32)
        )
        out_tokens_BT, lengths_B, truncated_B = jax.device_get(
            (out.tokens_BT, out.lengths_B, out.truncated_B)
        )
        for b, i in enumerate(indices):
            ids = out_tokens_BT[b, : lengths_B[b]].tolist()
            stopped[i] = not bool(truncated_B[b])
            token_ids[i] = ids[:-1] if stopped[i] else ids
            texts[i] = chat.tokenizer.decode(token_ids[i], skip_special=True)
    return Answers(texts, token_ids, stopped)


def run_batched(
    forward: Callable, rows: Sequence[Sequence[int]], *, pad: int, batch_size: int, **progress
) -> np.ndarray:
    """Applies forward(tokens_BT, mask_BT) -> [B, ...] to all rows in length-bucketed
    batches; returns the outputs in the order of `rows`."""
    outputs = [None] * len(rows)
    batches = length_batches(rows, batch_size)
    for indices, width in _progress(batches, **progress):
        full = _full_batch(indices, batch_size)
        tokens_BT, mask_BT = left_pad([rows[i] for i in full], width, pad)
        out = np.asarray(jax.device_get(forward(tokens_BT, mask_BT)))
        for b, i in enumerate(indices):
            outputs[i] = out[b]
    return np.stack(outputs) if outputs else np.zeros((0,))
