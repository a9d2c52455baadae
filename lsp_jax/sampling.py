"""Pure sampler: prefill once per prompt, then a `lax.while_loop` decode over a KV cache.

Legend as in `lsp_jax.model`, plus P prompts (before broadcasting to B = P * group_size
rows), T generated tokens (`SamplerConfig.max_new_tokens`) in the outputs and M stop ids
per row. Every function here is a function of arrays with its static options in
`SamplerConfig`, so `sample` runs inside an outer `jax.jit` (the self-play step) as well
as on its own through `jit_sample`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lsp_jax.errors import UserError
from lsp_jax.model import KVCache, Llama, LlamaConfig, constrain_cache, init_cache, vocab_logits

# Stop-id padding: never equal to a token id.
NO_STOP = -1
# Name scope of each decode while-loop, followed by its maximum number of iterations.
DECODE_SCOPE = "decode_steps_"


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampling options (hashable: pass as a static jit argument).

    max_new_tokens: tokens generated per row (the length T of the outputs).
    temperature: logits are divided by it before top-k/top-p and sampling; it also sets
      the distribution the returned log-probs are taken under (also when greedy).
    top_k: keep only the k most likely tokens (0: off).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (1.0: off). Applied after top-k, to the renormalized top-k distribution.
    greedy: take the argmax instead of sampling.
    stop_tokens: ids that end every row (added to any per-row `stop_tokens_BM`).
    pad_token: written after a row's stop token.
    decode_buckets: the decode loop is split into this many segments; segment k attends
      only to the cache slots the longest row can have filled by its end, so attention
      costs follow the generated length instead of the cache size (1: no bucketing).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0
    decode_buckets: int = 4

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens}; it must be at least 1.")
        if not self.temperature > 0:
            raise UserError(
                f"temperature={self.temperature} must be > 0; for argmax decoding set "
                "greedy=True (the temperature then only scales the returned log-probs)."
            )
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 turns top-k off).")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1] (1 turns top-p off).")
        if self.decode_buckets < 1:
            raise UserError(f"decode_buckets={self.decode_buckets} must be at least 1.")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)


@struct.dataclass
class SampleOutput:
    """What `sample` returns for B rows of T = max_new_tokens tokens.

    tokens_BT: int32 sampled ids; `pad_token` after a row's stop token.
    logprobs_BT: float32 log-probs of the sampled tokens under the *sampling
      distribution before truncation*, log_softmax(logits / temperature), i.e. what a
      full forward pass at that temperature gives (top-k/top-p do not change them);
      0 where the mask is False.
    mask_BT: True for the completion's tokens, up to and including the stop token.
    lengths_B: int32 completion lengths (the mask's row sums).
    truncated_B: True for rows that used all max_new_tokens without emitting a stop.
    cache: the final KVCache if asked for (`return_cache=True`), else None. It holds the
      prompt and all completion tokens but the last (which was never fed back).
    """

    tokens_BT: jax.Array
    logprobs_BT: jax.Array
    mask_BT: jax.Array
    lengths_B: jax.Array
    truncated_B: jax.Array
    cache: KVCache | None = None


@struct.dataclass
class _DecodeState:
    """Loop carry: `step` is the index of the next token to emit."""

    step: jax.Array
    last_B: jax.Array
    done_B: jax.Array
    tokens_BT: jax.Array
    logprobs_BT: jax.Array
    mask_BT: jax.Array
    cache: KVCache


def sample(
    config: LlamaConfig,
    params,
    prompt_tokens_PT,
    prompt_mask_PT,
    rng,
    sampler: SamplerConfig,
    *,
    group_size: int = 1,
    stop_tokens_BM=None,
    row_ids_B=None,
    return_cache: bool = False,
) -> SampleOutput:
    """Samples `group_size` completions of each of P left-padded prompts.

    Each prompt is prefilled once and its cache broadcast to its group; rows are
    ordered prompt-major (row p * group_size + g). Row b draws its t-th token with
    `fold_in(fold_in(rng, row_ids_B[b]), t)`, so a row's sample does not depend on the
    other rows, on padding, or on whether its prompt was prefilled in a group.

    Args:
      config: the model's LlamaConfig (static).
      params: the model's parameters.
      prompt_tokens_PT: int prompts, left-padded (every row ends with a real token).
      prompt_mask_PT: True for real prompt tokens.
      rng: a PRNG key.
      sampler: static SamplerConfig.
      group_size: static; completions per prompt (B = P * group_size rows).
      stop_tokens_BM: optional int [B, M] or [P, M] per-row stop ids, padded with -1;
        used together with `sampler.stop_tokens`.
      row_ids_B: optional int [B] ids that seed each row's randomness (default arange).
      return_cache: static; also return the final KV cache.

    Returns:
      SampleOutput of B rows.
    """
    if config.is_classifier:
        raise UserError("Cannot sample from a classifier (num_labels > 0); load a causal LM.")
    num_prompts, prompt_len = prompt_tokens_PT.shape
    batch = num_prompts * group_size
    prompt_mask_PT = prompt_mask_PT.astype(bool)
    with jax.named_scope("prefill"):
        logits_PV, cache = prefill(config, params, prompt_tokens_PT, prompt_mask_PT, sampler)
    logits_BV = jnp.repeat(logits_PV, group_size, axis=0)
    cache = broadcast_cache(cache, group_size)
    lengths_B = jnp.repeat(prompt_mask_PT.sum(-1, dtype=jnp.int32), group_size)
    stop_BM = _stop_table(sampler, stop_tokens_BM, num_prompts, group_size)
    if row_ids_B is None:
        row_ids_B = jnp.arange(batch, dtype=jnp.int32)
    row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids_B)

    emit = lambda state, logits_BV: _emit(state, logits_BV, row_keys_B, stop_BM, sampler)
    state = emit(_initial_state(cache, batch, sampler), logits_BV)
    first_step = 1
    for last_step in decode_segments(sampler.max_new_tokens, sampler.decode_buckets):
        # Step t feeds token t-1 into slot prompt_len + t - 1, so up to `last_step` the
        # attended slots are bounded by prompt_len + last_step.
        step_fn = _decode_step(config, params, lengths_B, prompt_len + last_step, emit)
        # The scope names the loop's most iterations: lsp_jax.tpu.hlo reads it from the
        # compiled program to count per-token costs (a while loop has no trip count).
        with jax.named_scope(f"{DECODE_SCOPE}{last_step - first_step + 1}"):
            state = jax.lax.while_loop(_continue(last_step), step_fn, state)
        first_step = last_step + 1
    return SampleOutput(
        tokens_BT=state.tokens_BT,
        logprobs_BT=state.logprobs_BT,
        mask_BT=state.mask_BT,
        lengths_B=state.mask_BT.sum(-1, dtype=jnp.int32),
        truncated_B=~state.done_B,
        cache=state.cache if return_cache else None,
    )


jit_sample = jax.jit(sample, static_argnames=("config", "sampler", "group_size", "return_cache"))
jit_sample.__doc__ = "`sample`, compiled once per (shapes, config, sampler, group_size)."


def _initial_state(cache: KVCache, batch: int, sampler: SamplerConfig) -> _DecodeState:
    shape_BT = (batch, sampler.max_new_tokens)
    return _DecodeState(
        step=jnp.zeros((), jnp.int32),
        last_B=jnp.zeros((batch,), jnp.int32),
        done_B=jnp.zeros((batch,), bool),
        tokens_BT=jnp.full(shape_BT, sampler.pad_token, jnp.int32),
        logprobs_BT=jnp.zeros(shape_BT, jnp.float32),
        mask_BT=jnp.zeros(shape_BT, bool),
        cache=cache,
    )


def prefill(config, params, prompt_tokens_PT, prompt_mask_PT, sampler):
    """Runs the prompts through the model into a cache sized for the whole completion.

    Returns:
      (logits_PV float32 at each prompt's last position, cache with prompt_len slots
      filled out of prompt_len + max_new_tokens - 1).
    """
    num_prompts, prompt_len = prompt_tokens_PT.shape
    cache = init_cache(config, num_prompts, prompt_len + sampler.max_new_tokens - 1)
    hidden_PTD, cache = Llama(config).apply(
        {"params": params},
        prompt_tokens_PT,
        mask_BT=prompt_mask_PT,
        cache=cache,
        attend_bound=prompt_len,
        return_hidden=True,
    )
    # Only the last position's logits are needed: skip the [P, T, V] head matmul.
    return vocab_logits(config, params, hidden_PTD[:, -1]), cache


def broadcast_cache(cache: KVCache, group_size: int) -> KVCache:
    """Repeats each row of a cache `group_size` times (row p -> rows p*G .. p*G+G-1)."""
    if group_size == 1:
        return cache
    return constrain_cache(
        KVCache(
            k_LBSKH=jnp.repeat(cache.k_LBSKH, group_size, axis=1),
            v_LBSKH=jnp.repeat(cache.v_LBSKH, group_size, axis=1),
            mask_BS=jnp.repeat(cache.mask_BS, group_size, axis=0),
            end=cache.end,
        )
    )


def decode_segments(max_new_tokens: int, num_buckets: int) -> list[int]:
    """The last decode step of each bucket: steps 1 .. max_new_tokens-1 split evenly."""
    num_steps = max_new_tokens - 1
    num_buckets = max(1, min(num_buckets, num_steps))
    ends = [-(-num_steps * (k + 1) // num_buckets) for k in range(num_buckets)]
    return [e for i, e in enumerate(ends) if e > 0 and (i == 0 or e > ends[i - 1])]


def _continue(last_step: int):
    def cond(state: _DecodeState):
        return (state.step <= last_step) & ~jnp.all(state.done_B)

    return cond


def _decode_step(config, params, prompt_lengths_B, attend_bound, emit):
    """One loop iteration: feed the last token, then emit the next one."""

    def body(state: _DecodeState) -> _DecodeState:
        prev = state.step - 1
        fed_mask_B1 = jax.lax.dynamic_slice_in_dim(state.mask_BT, prev, 1, axis=1)
        positions_B1 = (prompt_lengths_B + prev)[:, None]
        logits_B1V, cache = Llama(config).apply(
            {"params": params},
            state.last_B[:, None],
            positions_BT=positions_B1,
            mask_BT=fed_mask_B1,
            cache=state.cache,
            attend_bound=attend_bound,
        )
        return emit(state.replace(cache=cache), logits_B1V[:, 0])

    return body


def _emit(state: _DecodeState, logits_BV, row_keys_B, stop_BM, sampler) -> _DecodeState:
    """Chooses token `state.step` of every row and records it (pad for finished rows)."""
    step = state.step
    step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, step)
    token_B, logprob_B = choose_tokens(logits_BV, step_keys_B, sampler)
    active_B = ~state.done_B
    token_B = jnp.where(active_B, token_B, sampler.pad_token)
    logprob_B = jnp.where(active_B, logprob_B, 0.0)
    stopped_B = active_B & jnp.any(token_B[:, None] == stop_BM, axis=-1)
    write = lambda x_BT, v_B: jax.lax.dynamic_update_slice_in_dim(x_BT, v_B[:, None], step, 1)
    return state.replace(
        step=step + 1,
        last_B=token_B,
        done_B=state.done_B | stopped_B,
        tokens_BT=write(state.tokens_BT, token_B),
        logprobs_BT=write(state.logprobs_BT, logprob_B),
        mask_BT=write(state.mask_BT, active_B),
    )


def choose_tokens(logits_BV, keys_B, sampler: SamplerConfig):
    """Picks one token per row; returns (token_B int32, logprob_B float32).

    The log-prob is under log_softmax(logits / temperature), before top-k/top-p.
    """
    # float32: temperature scaling and log-softmax over a large vocabulary.
    scaled_BV = logits_BV.astype(jnp.float32) / sampler.temperature
    if sampler.greedy:
        token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    else:
        kept_BV = truncate_logits(scaled_BV, top_k=sampler.top_k, top_p=sampler.top_p)
        token_B = jax.vmap(jax.random.categorical)(keys_B, kept_BV).astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    logprob_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B, logprob_B


def truncate_logits(logits_BV, *, top_k: int = 0, top_p: float = 1.0):
    """Sets logits outside the top-k / top-p set to -inf (ties at the edge are kept).

    top-p keeps the most likely tokens until their probability reaches top_p (the
    token that crosses it is kept), measured after top-k truncation.
    """
    vocab = logits_BV.shape[-1]
    if (top_k == 0 or top_k >= vocab) and top_p >= 1.0:
        return logits_BV
    # Descending candidate logits: the top-k, or the whole sorted vocabulary for top-p.
    k = top_k if 0 < top_k < vocab else vocab
    sorted_BK = jax.lax.top_k(logits_BV, k)[0]
    threshold_B = sorted_BK[:, -1]
    if top_p < 1.0:
        probs_BK = jax.nn.softmax(sorted_BK, axis=-1)
        mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
        num_kept_B = jnp.sum(mass_before_BK < top_p, axis=-1)  # >= 1: the top is kept
        threshold_B = jnp.take_along_axis(sorted_BK, num_kept_B[:, None] - 1, axis=-1)[:, 0]
    return jnp.where(logits_BV >= threshold_B[:, None], logits_BV, -jnp.inf)


def _stop_table(sampler, stop_tokens_BM, num_prompts, group_size):
    """All stop ids of each row as one int32 [B, M] table (padded with NO_STOP)."""
    batch = num_prompts * group_size
    columns = [jnp.full((batch, 1), NO_STOP, jnp.int32)]
    if sampler.stop_tokens:
        static_M = jnp.asarray(np.array(sampler.stop_tokens, np.int32))
        columns.append(jnp.broadcast_to(static_M[None], (batch, len(sampler.stop_tokens))))
    if stop_tokens_BM is not None:
        stop_tokens_BM = jnp.asarray(stop_tokens_BM, jnp.int32)
        if stop_tokens_BM.ndim != 2 or stop_tokens_BM.shape[0] not in (batch, num_prompts):
            raise UserError(
                f"stop_tokens_BM has shape {stop_tokens_BM.shape}; expected [B, M] with "
                f"B = {batch} rows (or [P, M] with P = {num_prompts} prompts), padded with -1."
            )
        if stop_tokens_BM.shape[0] != batch:
            stop_tokens_BM = jnp.repeat(stop_tokens_BM, group_size, axis=0)
        columns.append(stop_tokens_BM)
    return jnp.concatenate(columns, axis=1)
