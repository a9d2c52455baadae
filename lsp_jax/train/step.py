"""One self-play iteration as one XLA program: rollouts, rewards, loss, optax update.

Reads like the algorithm of docs/algorithm.md:
    queries  ~ π_θ(· | challenger prompt)          (N rows, or a data batch for GRPO)
    answers  ~ π_θ(· | query)                      (G rows per query)
    R, R_Q   = reward model, reference judge        (in-graph, from logits)
    A_Sol, A_Ch = group baselines
    θ ← optax(∇(L_Sol + α_Ch L_Ch))
"""

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from lsp_jax import rl, sampling
from lsp_jax.game import rewards
from lsp_jax.game.advantages import (
    center_rewards,
    group_stats,
    role_rewards,
    truncated_to_group_min,
)
from lsp_jax.game.splice import content_lengths, splice_segments
from lsp_jax.model import (
    LlamaConfig,
    SharedPrefixLlama,
    lora,
    param_axes,
    unembedding,
    vocab_logits,
)
from lsp_jax.runtime import sharding
from lsp_jax.train.optim import skip_metrics


@struct.dataclass
class TrainState:
    """Everything a resumed run needs: iteration count, trained weights (the whole model,
    or with LoRA only the adapters), optimizer, randomness."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@struct.dataclass
class Frozen:
    """Inputs of the step that never change: reference and reward-model weights, the
    token templates, (GRPO) the prompt set and (LoRA) the policy's base weights. Never
    differentiated, never updated.

    With LoRA and the starting point as reference, `ref_params` is None: the reference
    is `base_params` itself, read without the adapters (one copy of the base in memory).
    """

    ref_params: Any
    rm_params: Any
    templates: Any  # lsp_jax.game.templates.GameTemplates (arrays)
    prompts: Any  # (tokens_PQ, lengths_P) for GRPO, else None
    base_params: Any = None  # LoRA: the frozen weights the adapters are added to.


def policy_params(frozen: Frozen, trained):
    """The policy's full parameters: the trained ones, or (LoRA) the frozen base with
    the trained adapters."""
    return trained if frozen.base_params is None else lora.combine(frozen.base_params, trained)


def reference_params(frozen: Frozen):
    """The reference (and judge) model's parameters: the base itself under LoRA when no
    separate reference was loaded."""
    return frozen.base_params if frozen.ref_params is None else frozen.ref_params


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static options of the step (hashable: the step compiles once per value)."""

    policy: LlamaConfig
    reference: LlamaConfig
    reward_model: LlamaConfig | None
    mode: str  # lsp | lsp_zero | grpo
    reward_kind: str  # model | self_judge | none
    judge_mode: str  # expected | sampled
    num_queries: int
    answers_per_query: int
    challenger: sampling.SamplerConfig
    solver: sampling.SamplerConfig
    judge: sampling.SamplerConfig | None
    judge_fallback: float
    truncated_reward: str  # score | group_min
    alpha_challenger: float
    normalize_std: bool
    beta: float
    kl_estimator: str
    aggregation: str
    logprob_chunk: int
    pad_id: int
    # Logical-axis rules of the rollouts (mesh.rollout_rules); () keeps the training
    # layout. See `rollout_params`.
    rollout_rules: tuple = ()
    # The loss and gradient run over this many chunks of the queries (and their
    # answers), accumulated in a lax.scan: peak activation memory / k, same gradient.
    update_microbatches: int = 1

    @property
    def uses_judge(self) -> bool:
        return self.mode == "lsp" or self.reward_kind == "self_judge"

    @property
    def judge_decodes(self) -> bool:
        """The reference generates judgements (sampled mode): it decodes, so it is
        stored in the rollout layout."""
        return self.uses_judge and self.judge_mode == "sampled"


def init_state(params, optimizer, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def lsp_step(state: TrainState, frozen: Frozen, *, cfg: StepConfig, optimizer):
    """One self-play iteration. Returns (state', metrics dict, rollout dict).

    The phases below are separate functions so that `lsp_jax.train.phases` can also run
    them as separate programs and time them; here they trace into one program. Their
    name scopes mark each phase's operations in the compiled program (`lsp_jax.tpu.hlo`).
    """
    k_challenger, k_solver, k_judge = phase_keys(state)
    with jax.named_scope("rollout_params"):
        policy = rollout_params(cfg, policy_params(frozen, state.params))
    with jax.named_scope("challenger_rollout"):
        queries = challenger_rollout(cfg, policy, frozen, k_challenger, state.step)
    with jax.named_scope("solver_rollout"):
        solver = solver_rollout(cfg, policy, frozen, queries, k_solver)
    with jax.named_scope("rewards"):
        scores = score_answers(cfg, frozen, queries, solver["answers"], k_judge)
    with jax.named_scope("reference"):
        reference = reference_logprobs(cfg, frozen, queries, solver)
    with jax.named_scope("update"):
        return update(
            cfg, optimizer, state, queries, solver, scores, reference, base=frozen.base_params
        )


def rollout_params(cfg: StepConfig, params):
    """The policy's weights as the rollouts read them, made once per iteration.

    Training keeps parameters FSDP-sharded, which suits the update: one gather per layer
    for thousands of tokens. A decode step processes one token per row, so gathering
    every layer for it would move the whole model over the interconnect per generated
    token. Instead the weight matrices are cast to the compute dtype and resharded to
    `cfg.rollout_rules` (by default heads, kv heads, MLP and vocabulary split over the
    fsdp and tensor chips): each decode step then reads its chip's shard from HBM and
    only activations ([rows, D] partial sums) cross chips. Norm scales keep their dtype
    (RMSNorm reads them in float32 at least).
    """
    narrower = jnp.dtype(cfg.policy.dtype).itemsize < jnp.dtype(cfg.policy.param_dtype).itemsize

    def cast(x):
        return x.astype(cfg.policy.dtype) if narrower and x.ndim >= 2 else x

    params = jax.tree.map(cast, params)
    return sharding.constrain_logical(params, param_axes(cfg.policy), cfg.rollout_rules)


def rollout_layout(cfg: StepConfig):
    """The logical-axis rules in force while decoding (activations and KV caches laid
    out to match `rollout_params`)."""
    if not cfg.rollout_rules:
        return contextlib.nullcontext()
    return nn.logical_axis_rules(cfg.rollout_rules)


def phase_keys(state: TrainState):
    """(Challenger, Solver, judge) sampling keys of this iteration."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return tuple(jax.random.split(rng, 3))


def solver_rollout(cfg: StepConfig, params, frozen: Frozen, queries, rng):
    """G answers to each query: the queries spliced into the Solver's chat turn, each
    prompt prefilled once for its G rows."""
    t = frozen.templates
    query_NQ, _ = neutralize_special_tokens(queries["tokens"], queries["content_lengths"], t)
    prompt_NP, prompt_mask_NP = splice_segments(
        [t.user_prefix, (query_NQ, queries["content_lengths"]), t.user_suffix],
        pad_id=cfg.pad_id,
    )
    with rollout_layout(cfg):
        answers = sampling.sample(
            cfg.policy,
            params,
            prompt_NP,
            prompt_mask_NP,
            rng,
            cfg.solver,
            group_size=cfg.answers_per_query,
        )
    return {"prompt": prompt_NP, "prompt_mask": prompt_mask_NP, "answers": answers}


def _role_rows(queries, solver):
    """(Solver rows, Challenger rows or None): (prompt, prompt mask, completion,
    completion mask) of each role's batch."""
    answers = solver["answers"]
    solver_rows = (solver["prompt"], solver["prompt_mask"], answers.tokens_BT, answers.mask_BT)
    return solver_rows, queries.get("rows")


def reference_logprobs(cfg: StepConfig, frozen: Frozen, queries, solver):
    """The frozen reference model's log-probs of the answers [B, A] and (not GRPO) of
    the queries [N, Q], for the KL terms."""
    rows = [r for r in _role_rows(queries, solver) if r is not None]
    ref_params = reference_params(frozen)
    ref_sol_BA, *ref_ch = groups_logprobs(cfg.reference, ref_params, rows, cfg)
    return {"solver": ref_sol_BA, "challenger": ref_ch[0] if ref_ch else None}


def update(
    cfg: StepConfig, optimizer, state: TrainState, queries, solver, scores, reference, *, base=None
):
    """Advantages, the LSP loss, its gradient and the optax update; (state', metrics,
    rollout). base: the frozen LoRA base (state.params are then the adapters), or None."""
    params = state.params
    answers = solver["answers"]
    reward_NG, quality_NG, judge_metrics = scores
    solver_adv_NG, challenger_adv_N, game_metrics = game_advantages(
        cfg, reward_NG, quality_NG, queries, answers, reference
    )
    batch = loss_batch(cfg, queries, solver, reference, solver_adv_NG, challenger_adv_N)
    loss, logp, grads = loss_and_grads(cfg, params, batch, base=base)
    aux = {
        "solver": role_metrics(cfg, batch["solver"], logp["solver"]),
        "logp_solver": logp["solver"],
    }
    if "challenger" in batch:
        aux["challenger"] = role_metrics(cfg, batch["challenger"], logp["challenger"])
        aux["logp_challenger"] = logp["challenger"]
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)

    metrics = step_metrics(
        cfg,
        loss,
        aux,
        grads,
        updates,
        params,
        queries,
        answers,
        reward_NG,
        quality_NG,
        solver_adv_NG,
        challenger_adv_N,
    )
    metrics.update(judge_metrics)
    metrics.update(game_metrics)
    metrics.update(skip_metrics(opt_state))
    rollout = {
        "query_tokens": queries["tokens"],
        "query_lengths": queries["content_lengths"],
        "answer_tokens": answers.tokens_BT,
        "answer_lengths": content_lengths(answers.lengths_B, ~answers.truncated_B),
        "reward": reward_NG,
        "quality": quality_NG,
    }
    return new_state, metrics, rollout


def loss_batch(cfg: StepConfig, queries, solver, reference, solver_adv_NG, challenger_adv_N):
    """What the loss reads, with the query as the leading axis of every per-row array
    (so that micro-batches are whole queries with their G answers).

    Returns {'solver': {...}, 'challenger': {...} (not GRPO)}; each role holds prompt,
    prompt_mask (the Challenger's single prompt is shared, not split), tokens, mask,
    ref_logp and adv, plus 'normalizer': the whole batch's loss denominator.
    """
    n, g = cfg.num_queries, cfg.answers_per_query
    answers = solver["answers"]
    per_query = lambda x: x.reshape(n, g, *x.shape[1:])
    sol = {
        "prompt": solver["prompt"],
        "prompt_mask": solver["prompt_mask"],
        "tokens": per_query(answers.tokens_BT),
        "mask": per_query(answers.mask_BT),
        "ref_logp": per_query(reference["solver"]),
        "adv": solver_adv_NG,
    }
    batch = {"solver": sol}
    if queries.get("rows") is not None:
        prompt_1P, prompt_mask_1P, tokens_NQ, mask_NQ = queries["rows"]
        batch["challenger"] = {
            "prompt": prompt_1P,
            "prompt_mask": prompt_mask_1P,
            "tokens": tokens_NQ,
            "mask": mask_NQ,
            "ref_logp": reference["challenger"],
            "adv": challenger_adv_N,
        }
    for role in batch.values():
        role["normalizer"] = _normalizer(cfg, role["mask"])
    return batch


def _normalizer(cfg: StepConfig, mask):
    """The denominator of a role's loss over the whole batch (policy_loss's default for
    the batch), fixed before micro-batching so chunks add up to the full loss."""
    if cfg.aggregation == "sequence_sum":
        return jnp.float32(mask.reshape(-1, mask.shape[-1]).shape[0])
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _role_rows_of(role):
    """(prompt, prompt mask, tokens [rows, T], mask) of one role of a batch or chunk."""
    tokens = role["tokens"].reshape(-1, role["tokens"].shape[-1])
    return role["prompt"], role["prompt_mask"], tokens, role["mask"].reshape(tokens.shape)


def _role_loss(cfg: StepConfig, role, logp):
    """One role's loss contribution, given its log-probs [rows, T]."""
    _, _, tokens, mask = _role_rows_of(role)
    loss, _ = rl.policy_loss(
        logp,
        role["ref_logp"].reshape(tokens.shape),
        role["adv"].reshape(-1),
        mask,
        beta=cfg.beta,
        kl_estimator=cfg.kl_estimator,
        aggregation=cfg.aggregation,
        normalizer=role["normalizer"],
    )
    return loss


def _chunk_loss(cfg: StepConfig, params, chunk):
    """L_Sol + α_Ch·L_Ch of one chunk of queries (each term already divided by the
    whole batch's normalizer); aux: the chunk's log-probs per role."""
    names = [name for name in ("solver", "challenger") if name in chunk]
    # Both roles in one pass through the layers: one gradient buffer, not one per pass.
    rows = [_role_rows_of(chunk[name]) for name in names]
    logp = dict(zip(names, groups_logprobs(cfg.policy, params, rows, cfg)))
    loss = _role_loss(cfg, chunk["solver"], logp["solver"])
    if "challenger" in chunk:
        loss_ch = _role_loss(cfg, chunk["challenger"], logp["challenger"])
        loss = rl.lsp_loss(loss, loss_ch, alpha_challenger=cfg.alpha_challenger)
    return loss, logp


def loss_and_grads(cfg: StepConfig, params, batch, *, base=None):
    """(loss, log-probs per role, gradient) of the whole batch, computed over
    `cfg.update_microbatches` chunks of queries accumulated in a lax.scan: activations
    of one chunk at a time, the same gradient up to summation order. With a LoRA `base`,
    `params` are the adapters and the gradient is theirs alone."""
    full = (lambda p: p) if base is None else (lambda p: lora.combine(base, p))
    grad_fn = jax.value_and_grad(lambda p, c: _chunk_loss(cfg, full(p), c), has_aux=True)
    k = cfg.update_microbatches
    if k == 1:
        (loss, logp), grads = grad_fn(params, batch)
        return loss, logp, grads
    chunks = _split_queries(batch, k)
    shared = _shared_parts(batch)

    def body(carry, chunk):
        loss_sum, grad_sum = carry
        (loss, logp), grads = grad_fn(params, _merge(chunk, shared))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (loss_sum + loss, grad_sum), logp

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), logp = jax.lax.scan(body, (jnp.float32(0.0), zeros), chunks)
    logp = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), logp)
    return loss, logp, grads


# Per-role entries that are the same for every chunk (not split by query).
_SHARED = {"solver": ("normalizer",), "challenger": ("prompt", "prompt_mask", "normalizer")}


def _split_queries(batch, k: int):
    """Every per-query array [N, ...] -> [k, N/k, ...] (the scan's chunks)."""
    split = lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:])
    return {
        role: {name: split(x) for name, x in arrays.items() if name not in _SHARED[role]}
        for role, arrays in batch.items()
    }


def _shared_parts(batch):
    return {role: {name: batch[role][name] for name in _SHARED[role]} for role in batch}


def _merge(chunk, shared):
    return {role: {**chunk[role], **shared[role]} for role in chunk}


def role_metrics(cfg: StepConfig, role, logp):
    """policy_loss's diagnostics of one role over the whole batch (no gradient)."""
    tokens = role["tokens"].reshape(-1, role["tokens"].shape[-1])
    _, metrics = rl.policy_loss(
        jax.lax.stop_gradient(logp),
        role["ref_logp"].reshape(tokens.shape),
        role["adv"].reshape(-1),
        role["mask"].reshape(tokens.shape),
        beta=cfg.beta,
        kl_estimator=cfg.kl_estimator,
        aggregation=cfg.aggregation,
        normalizer=role["normalizer"],
    )
    return metrics


def game_advantages(cfg: StepConfig, reward_NG, quality_NG, queries, answers, reference):
    """(solver_adv_NG, challenger_adv_N, metrics): docs/algorithm.md's advantages, with the
    options the paper leaves open.

    game.truncated_reward=group_min: a truncated answer's reward (a truncated query's
    Challenger reward) becomes its group's minimum. loss.kl_estimator=in_reward: each
    role's reward loses β times the log-ratio of its own sequence (the answer's for the
    Solver, the query's for the Challenger), after V(q) is taken from R alone.
    """
    N, G = reward_NG.shape
    quality = quality_NG if cfg.mode != "lsp_zero" else None
    solver_r_NG, challenger_r_N = role_rewards(reward_NG, quality, mode=cfg.mode)
    truncated_NG = answers.truncated_B.reshape(N, G)
    truncated_N = queries.get("truncated", jnp.zeros((N,), bool))
    metrics = {}
    if cfg.truncated_reward == "group_min":
        solver_r_NG = truncated_to_group_min(solver_r_NG, truncated_NG, axis=1)
        if cfg.mode != "grpo":
            challenger_r_N = truncated_to_group_min(challenger_r_N, truncated_N, axis=0)
        metrics["truncated/answers_at_group_min"] = jnp.mean(truncated_NG.astype(jnp.float32))
        metrics["truncated/queries_at_group_min"] = jnp.mean(truncated_N.astype(jnp.float32))
    if cfg.kl_estimator == "in_reward":
        logratio_NG = rl.sequence_logratio(
            answers.logprobs_BT, reference["solver"], answers.mask_BT
        ).reshape(N, G)
        solver_r_NG = rl.kl_in_reward(solver_r_NG, logratio_NG, cfg.beta)
        if reference["challenger"] is not None:
            logratio_N = rl.sequence_logratio(
                queries["logprobs"], reference["challenger"], queries["mask"]
            )
            challenger_r_N = rl.kl_in_reward(challenger_r_N, logratio_N, cfg.beta)
    solver_adv_NG, challenger_adv_N = center_rewards(
        solver_r_NG, challenger_r_N, normalize_std=cfg.normalize_std
    )
    return solver_adv_NG, challenger_adv_N, metrics


def neutralize_special_tokens(tokens_BL, lengths_B, templates):
    """Generated tokens with every special token (<|im_start|>, <|start_header_id|>,
    ...) inside the first `lengths_B` replaced by a plain token, before they are spliced
    into another model's prompt: a query or answer must not open or close turns in the
    Solver's, the judge's or the reward model's input. Returns (tokens_BL, count_B)."""
    special_BL = jnp.isin(tokens_BL, templates.special_ids)
    inside_BL = jnp.arange(tokens_BL.shape[1])[None, :] < lengths_B[:, None]
    count_B = jnp.sum(special_BL & inside_BL, axis=1).astype(jnp.float32)
    return jnp.where(special_BL, templates.neutral_id, tokens_BL), count_B


def challenger_rollout(cfg: StepConfig, params, frozen: Frozen, rng, step):
    """The N queries: sampled by the Challenger, or (GRPO) taken from the prompt set."""
    if cfg.mode == "grpo":
        tokens_PQ, lengths_P = frozen.prompts
        num_prompts = tokens_PQ.shape[0]
        index_N = (step * cfg.num_queries + jnp.arange(cfg.num_queries)) % num_prompts
        return {"tokens": tokens_PQ[index_N], "content_lengths": lengths_P[index_N]}
    prompt_1P = frozen.templates.challenger_prompt[None]
    prompt_mask_1P = jnp.ones(prompt_1P.shape, bool)
    with rollout_layout(cfg):
        out = sampling.sample(
            cfg.policy,
            params,
            prompt_1P,
            prompt_mask_1P,
            rng,
            cfg.challenger,
            group_size=cfg.num_queries,
        )
    return {
        "tokens": out.tokens_BT,
        "content_lengths": content_lengths(out.lengths_B, ~out.truncated_B),
        "truncated": out.truncated_B,
        "logprobs": out.logprobs_BT,
        "mask": out.mask_BT,
        "rows": (prompt_1P, prompt_mask_1P, out.tokens_BT, out.mask_BT),
    }


def score_answers(cfg: StepConfig, frozen: Frozen, queries, answers, rng):
    """R (reward model, self-judge or zero) and R_Q (reference judge), each [N, G]."""
    N, G = cfg.num_queries, cfg.answers_per_query
    t = frozen.templates
    query_NQ, query_specials_N = neutralize_special_tokens(
        queries["tokens"], queries["content_lengths"], t
    )
    query_BQ = jnp.repeat(query_NQ, G, axis=0)
    query_len_B = jnp.repeat(queries["content_lengths"], G, axis=0)
    answer_len_B = content_lengths(answers.lengths_B, ~answers.truncated_B)
    answer_BA, answer_specials_B = neutralize_special_tokens(answers.tokens_BT, answer_len_B, t)
    pair = [(query_BQ, query_len_B), (answer_BA, answer_len_B)]
    judge_NG, metrics = None, {}
    if cfg.uses_judge:
        # The judge prefix (instructions) is the same for every pair: it is run once.
        tokens, mask = splice_segments(
            [pair[0], t.judge_middle, pair[1], t.judge_suffix], pad_id=cfg.pad_id
        )
        ref_params = reference_params(frozen)
        judge_B, metrics = judge_scores(cfg, ref_params, tokens, mask, t, rng)
        judge_NG = judge_B.reshape(N, G)
    if cfg.reward_kind == "model":
        tokens, mask = splice_segments(
            [pair[0], t.rm_middle, pair[1], t.rm_suffix], pad_id=cfg.pad_id
        )
        prefix_1P = t.rm_prefix[0]
        last_BD = forward_with_prefix(
            cfg.reward_model,
            frozen.rm_params,
            prefix_1P,
            jnp.ones(prefix_1P.shape, bool),
            tokens,
            mask,
        )[1]
        # float32 head: in bfloat16 a score near 10 is rounded to steps of 0.06.
        kernel_DC = frozen.rm_params["score"]["kernel"].astype(jnp.float32)
        # The variable part is left-padded: its last column is each row's last token.
        last_BD = last_BD.astype(jnp.float32)
        reward_NG = jnp.einsum("BD,DC->BC", last_BD, kernel_DC)[:, 0].reshape(N, G)
    elif cfg.reward_kind == "self_judge":
        reward_NG = judge_NG
    else:
        reward_NG = jnp.zeros((N, G), jnp.float32)
    quality_NG = judge_NG if cfg.mode == "lsp" else None
    # Special tokens the policy wrote inside its text (neutralized above), per sequence.
    metrics["special_tokens/query"] = jnp.mean(query_specials_N)
    metrics["special_tokens/answer"] = jnp.mean(answer_specials_B)
    return reward_NG, quality_NG, metrics


def judge_scores(cfg: StepConfig, ref_params, tokens_BT, mask_BT, templates, rng):
    """The reference model's 0..7 quality score of each judged pair, [B] float32.

    tokens_BT / mask_BT: each pair's text after the (shared) judge prefix, left-padded.
    """
    prefix_1P = templates.judge_prefix[0]
    prefix_mask_1P = jnp.ones(prefix_1P.shape, bool)
    if cfg.judge_mode == "expected":
        # The prompt ends with the score tag: one forward pass, read the digit tokens.
        last_BD = forward_with_prefix(
            cfg.reference, ref_params, prefix_1P, prefix_mask_1P, tokens_BT, mask_BT
        )[1]
        logits_BV = vocab_logits(cfg.reference, ref_params, last_BD)
        digit_mass = jnp.mean(rewards.judge_digit_mass(logits_BV, templates.digit_ids))
        score_B = rewards.expected_judge_score(logits_BV, templates.digit_ids)
        return score_B, {"judge/digit_mass": digit_mass}
    batch = tokens_BT.shape[0]
    full_BT = jnp.concatenate(
        [jnp.broadcast_to(prefix_1P, (batch, prefix_1P.shape[1])), tokens_BT], axis=1
    )
    full_mask_BT = jnp.concatenate([jnp.ones((batch, prefix_1P.shape[1]), bool), mask_BT], 1)
    with rollout_layout(cfg):
        out = sampling.sample(cfg.reference, ref_params, full_BT, full_mask_BT, rng, cfg.judge)
    score_B, parsed_B = rewards.parse_sampled_score(
        out.tokens_BT,
        out.mask_BT,
        templates.score_tags,
        fallback=cfg.judge_fallback,
    )
    failures = 1.0 - jnp.mean(parsed_B.astype(jnp.float32))
    return score_B, {"judge/parse_failure_rate": failures}


def forward_with_prefix(model_cfg, params, prefix_PT, prefix_mask_PT, tokens_BA, mask_BA):
    """Runs P prefixes once, then B = P·k continuations (row b continues prefix b // k)
    attending to them, as the sampler does; gradients flow through both parts.

    Returns:
      (hidden_BAD of the continuation tokens, last_BD: each row's final hidden state,
      prefix_last_BD: the prefix's final hidden state, which predicts token 0).
    """
    group = (prefix_PT, prefix_mask_PT, tokens_BA, mask_BA)
    return forward_groups(model_cfg, params, [group])[0]


def forward_groups(model_cfg, params, groups):
    """`forward_with_prefix` of several groups [(prefix_PT, prefix_mask_PT, tokens_BA,
    mask_BA), ...] in one pass through the layers (SharedPrefixLlama), so that their
    gradient is built once. Returns one forward_with_prefix triple per group."""
    hidden = SharedPrefixLlama(model_cfg).apply({"params": params}, tuple(groups))
    out = []
    for (prefix_PT, *_), (prefix_PTD, hidden_BAD) in zip(groups, hidden):
        group = hidden_BAD.shape[0] // prefix_PT.shape[0]
        prefix_last_BD = jnp.repeat(prefix_PTD[:, -1], group, axis=0)
        out.append((hidden_BAD, hidden_BAD[:, -1], prefix_last_BD))
    return out


def completion_logprobs(model_cfg, params, prompt_PT, prompt_mask_PT, tokens_BA, mask_BA, cfg):
    """log π(completion token | prompt, earlier tokens) at the sampling temperature, [B, A].

    Each of the P prompts is shared by B / P completion rows and computed once. The same
    temperature as the sampler, so these equal the sampler's log-probs when params are
    the sampling params (the metric `logprob/max_sampler_gap` checks it).
    """
    rows = (prompt_PT, prompt_mask_PT, tokens_BA, mask_BA)
    return groups_logprobs(model_cfg, params, [rows], cfg)[0]


def groups_logprobs(model_cfg, params, groups, cfg):
    """`completion_logprobs` of several groups of rows (e.g. the Solver's and the
    Challenger's) from one pass through the layers; a list of [B, A] arrays."""
    out = []
    for (_, _, tokens_BA, _), (hidden_BAD, _, prefix_last_BD) in zip(
        groups, forward_groups(model_cfg, params, groups)
    ):
        # Token 0 is predicted by the prompt's last position, token t by completion t - 1.
        hidden_BAD = jnp.concatenate([prefix_last_BD[:, None], hidden_BAD[:, :-1]], axis=1)
        out.append(_token_logprobs(model_cfg, params, hidden_BAD, tokens_BA, cfg))
    return out


def _token_logprobs(model_cfg, params, hidden_BAD, tokens_BA, cfg):
    if cfg.logprob_chunk:
        matrix, layout = unembedding(model_cfg, params)
        return rl.chunked_token_logprobs(
            hidden_BAD,
            matrix.astype(model_cfg.dtype),
            tokens_BA,
            layout=layout,
            chunk=cfg.logprob_chunk,
            temperature=cfg.solver.temperature,
        )
    logits_BAV = vocab_logits(model_cfg, params, hidden_BAD)
    return rl.token_logprobs(logits_BAV, tokens_BA, temperature=cfg.solver.temperature)


def step_metrics(
    cfg,
    loss,
    aux,
    grads,
    updates,
    params,
    queries,
    answers,
    reward_NG,
    quality_NG,
    solver_adv_NG,
    challenger_adv_N,
):
    """Scalars logged every iteration (all float32, computed in-graph)."""
    mask_f = answers.mask_BT.astype(jnp.float32)
    gap_sol = jnp.max(jnp.abs(aux["logp_solver"] - answers.logprobs_BT) * mask_f)
    m = {
        "loss/total": loss,
        "reward/solver": jnp.mean(reward_NG),
        "advantage/solver_abs": jnp.mean(jnp.abs(solver_adv_NG)),
        "advantage/challenger_abs": jnp.mean(jnp.abs(challenger_adv_N)),
        "reward/challenger": -jnp.mean(reward_NG),
        "length/answer": jnp.mean(answers.lengths_B.astype(jnp.float32)),
        "truncated/answer": jnp.mean(answers.truncated_B.astype(jnp.float32)),
        "logprob/max_sampler_gap": gap_sol,
        "norm/grad": optax.global_norm(grads),
        "norm/update": optax.global_norm(updates),
        "norm/param": optax.global_norm(params),
        "tokens/generated": jnp.sum(answers.lengths_B).astype(jnp.float32),
    }
    m.update({f"groups/{k}": v for k, v in group_stats(reward_NG).items()})
    m.update({f"solver/{k}": v for k, v in aux["solver"].items()})
    m["kl/solver"] = aux["solver"]["kl_per_sequence"]
    m["entropy/solver_sampled"] = -aux["solver"]["logp_per_token"]
    if quality_NG is not None:
        m["quality/solver"] = jnp.mean(quality_NG)
        m["reward/challenger"] = -jnp.mean(reward_NG) + jnp.mean(quality_NG)
    if "challenger" in aux:
        mask_q = queries["mask"].astype(jnp.float32)
        m["kl/challenger"] = aux["challenger"]["kl_per_sequence"]
        m["entropy/challenger_sampled"] = -aux["challenger"]["logp_per_token"]
        m["length/query"] = jnp.mean(queries["mask"].sum(-1).astype(jnp.float32))
        m["truncated/query"] = jnp.mean(queries["truncated"].astype(jnp.float32))
        gap_ch = jnp.max(jnp.abs(aux["logp_challenger"] - queries["logprobs"]) * mask_q)
        m["logprob/max_sampler_gap"] = jnp.maximum(gap_sol, gap_ch)
        m["tokens/generated"] += jnp.sum(queries["mask"]).astype(jnp.float32)
        m.update({f"challenger/{k}": v for k, v in aux["challenger"].items()})
    else:
        m["length/query"] = jnp.mean(queries["content_lengths"].astype(jnp.float32))
    return m
