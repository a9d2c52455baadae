"""One self-play iteration as one XLA program: rollouts, rewards, loss, optax update.

Reads like the algorithm of docs/algorithm.md:
    queries  ~ π_θ(· | challenger prompt)          (N rows, or a data batch for GRPO)
    answers  ~ π_θ(· | query)                      (G rows per query)
    R, R_Q   = reward model, reference judge        (in-graph, from logits)
    A_Sol, A_Ch = group baselines
    θ ← optax(∇(L_Sol + α_Ch L_Ch))
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lsp_jax import rl, sampling
from lsp_jax.game import rewards
from lsp_jax.game.advantages import (
    center_rewards,
    group_stats,
    role_rewards,
    truncated_to_group_min,
)
from lsp_jax.game.splice import content_lengths, splice_segments
from lsp_jax.model import param_axes, vocab_logits
from lsp_jax.runtime import sharding
from lsp_jax.train.forward import forward_with_prefix, groups_logprobs
from lsp_jax.train.loss import loss_and_grads, loss_batch, role_metrics
from lsp_jax.train.optim import skip_metrics
from lsp_jax.train.state import Frozen, StepConfig, TrainState, policy_params, reference_params


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

    # The barrier fences the training-layout parameters (which the update reads later in
    # the same program) off from the rollout constraint below, so the compiler cannot
    # carry the rollout layout back into them. Without it, the fused iteration on a
    # (2, 2, 2) mesh of XLA:CPU devices computed the update's log-probs up to 0.06 off
    # (every other mesh, and the same code as two programs, matched one device):
    # tests/test_sharding.py. It moves no data: the parameters are already buffers.
    params = jax.tree.map(cast, jax.lax.optimization_barrier(params))
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
