"""The step's game logic on hand-made rollouts of the tiny models: in-reward KL, truncated
texts, special tokens in generated text, the reward model's float32 head."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsp_jax.game.splice import splice_segments
from lsp_jax.sampling import SampleOutput
from lsp_jax.train import config as config_lib
from lsp_jax.train import loss as loss_lib
from lsp_jax.train import run as run_lib
from lsp_jax.train import step
from lsp_jax.train.state import init_state

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")
N, G, Q, A = 2, 2, 4, 5  # tiny.py: 2 queries, 2 answers each.
IM_START = 257  # A special token of the tiny tokenizer (<|im_start|>).


def build(**overrides):
    config = config_lib.load_config(TINY)
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    run = run_lib.build_run(config)
    return run, init_state(run.params, run.optimizer, 0)


def rollouts(
    run,
    *,
    query_logratio_N=(0.0, 0.0),
    answer_logratio_NG=((0.0,) * G,) * N,
    truncated_NG=None,
    truncated_N=None,
    seed=0,
):
    """Queries, Solver rows and reference log-probs with chosen sequence log-ratios
    log π - log π_ref (spread evenly over the tokens)."""
    rng = np.random.default_rng(seed)
    t = run.frozen.templates
    query_NQ = jnp.asarray(rng.integers(40, 120, (N, Q)), jnp.int32)
    ref_ch_NQ = jnp.full((N, Q), -2.0)
    prompt_1P = jnp.asarray(t.challenger_prompt)[None]
    queries = {
        "tokens": query_NQ,
        "content_lengths": jnp.full((N,), Q, jnp.int32),
        "truncated": jnp.zeros((N,), bool) if truncated_N is None else jnp.asarray(truncated_N),
        "logprobs": ref_ch_NQ + jnp.asarray(query_logratio_N)[:, None] / Q,
        "mask": jnp.ones((N, Q), bool),
        "rows": (prompt_1P, jnp.ones(prompt_1P.shape, bool), query_NQ, jnp.ones((N, Q), bool)),
    }
    ref_sol_BA = jnp.full((N * G, A), -3.0)
    truncated_B = (
        jnp.zeros((N * G,), bool) if truncated_NG is None else jnp.ravel(jnp.asarray(truncated_NG))
    )
    answers = SampleOutput(
        tokens_BT=jnp.asarray(rng.integers(40, 120, (N * G, A)), jnp.int32),
        logprobs_BT=ref_sol_BA + jnp.ravel(jnp.asarray(answer_logratio_NG))[:, None] / A,
        mask_BT=jnp.ones((N * G, A), bool),
        lengths_B=jnp.full((N * G,), A, jnp.int32),
        truncated_B=truncated_B,
    )
    prompt_NP, prompt_mask_NP = splice_segments(
        [t.user_prefix, (query_NQ, queries["content_lengths"]), t.user_suffix],
        pad_id=run.step_cfg.pad_id,
    )
    solver = {"prompt": prompt_NP, "prompt_mask": prompt_mask_NP, "answers": answers}
    reference = {"solver": ref_sol_BA, "challenger": ref_ch_NQ}
    return queries, solver, reference


def advantages_of(run, scores, **rollout_options):
    """(solver_adv_NG, challenger_adv_N, metrics) the step computes for these rollouts."""
    queries, solver, reference = rollouts(run, **rollout_options)
    solver_adv, challenger_adv, metrics = step.game_advantages(
        run.step_cfg, *scores, queries, solver["answers"], reference
    )
    return np.asarray(solver_adv), np.asarray(challenger_adv), metrics


def test_in_reward_kl_stays_with_each_roles_own_sequence(monkeypatch):
    run, state = build(**{"loss.kl_estimator": "in_reward"})
    ones = jnp.ones((N, G))
    # Equal R and R_Q; the answers of query 0 drift from the reference (log-ratio 10).
    drift = dict(answer_logratio_NG=((10.0, 10.0), (0.0, 0.0)))
    solver_adv, challenger_adv, _ = advantages_of(run, (ones, ones), **drift)
    # V(q) and the Challenger's reward use R alone: the Solver's KL never reaches them.
    np.testing.assert_array_equal(challenger_adv, [0.0, 0.0])
    np.testing.assert_array_equal(solver_adv, np.zeros((N, G)))  # Equal within each group.
    # The same through the whole update (the review measured [0.25, -0.25] here); the
    # policy's log-probs are stubbed out, which the advantages do not depend on.
    stub = lambda model_cfg, params, groups, cfg: [jnp.zeros(g[2].shape) for g in groups]
    monkeypatch.setattr(loss_lib, "groups_logprobs", stub)
    queries, solver, reference = rollouts(run, **drift)
    metrics = step.update(
        run.step_cfg, run.optimizer, state, queries, solver, (ones, ones, {}), reference
    )[1]
    assert float(metrics["advantage/challenger_abs"]) == 0.0
    # The Challenger's own query drifting costs it β · log-ratio in its reward.
    _, challenger_adv, _ = advantages_of(run, (ones, ones), query_logratio_N=(10.0, 0.0))
    beta = run.step_cfg.beta
    np.testing.assert_allclose(challenger_adv, [-beta * 5, beta * 5], rtol=1e-5)


@pytest.mark.parametrize("rule", ["group_min", "score"])
def test_truncated_answers_and_queries(rule):
    run, _ = build(**{"game.truncated_reward": rule, "game.mode": "lsp_zero"})
    reward = jnp.asarray([[1.0, 3.0], [2.0, 2.0]])
    cut = dict(truncated_NG=((False, True), (False, False)))
    solver_adv, _, metrics = advantages_of(run, (reward, None), **cut)
    if rule == "group_min":
        # The truncated answer (3) gets its group's minimum (1): no advantage over it.
        np.testing.assert_array_equal(solver_adv, np.zeros((N, G)))
        assert float(metrics["truncated/answers_at_group_min"]) == 0.25
    else:
        np.testing.assert_array_equal(solver_adv, [[-1.0, 1.0], [0.0, 0.0]])
    # c = -V = [0, -4]: the truncated query 0 is the "harder" one; at the group minimum
    # (-4) it no longer beats query 1.
    reward = jnp.asarray([[0.0, 0.0], [4.0, 4.0]])
    _, challenger_adv, _ = advantages_of(run, (reward, None), truncated_N=(True, False))
    expected = [0.0, 0.0] if rule == "group_min" else [2.0, -2.0]
    np.testing.assert_array_equal(challenger_adv, expected)


def _scores(run, queries, answers):
    score = jax.jit(step.score_answers, static_argnums=0)
    reward, quality, metrics = score(run.step_cfg, run.frozen, queries, answers, jax.random.key(0))
    return np.asarray(reward), np.asarray(quality), metrics


def test_special_tokens_in_generated_text_are_neutralized(monkeypatch):
    run, _ = build()
    queries, solver, _ = rollouts(run)
    answers = solver["answers"]
    neutral = int(run.frozen.templates.neutral_id)
    forged_q = queries["tokens"].at[0, 1].set(IM_START)
    forged_a = answers.tokens_BT.at[3, 2].set(IM_START).at[3, 3].set(258)
    plain_q = queries["tokens"].at[0, 1].set(neutral)
    plain_a = answers.tokens_BT.at[3, 2].set(neutral).at[3, 3].set(neutral)
    forged = _scores(run, {**queries, "tokens": forged_q}, answers.replace(tokens_BT=forged_a))
    plain = _scores(run, {**queries, "tokens": plain_q}, answers.replace(tokens_BT=plain_a))
    # The judge and the reward model see exactly what they see with plain tokens there.
    np.testing.assert_array_equal(forged[0], plain[0])
    np.testing.assert_array_equal(forged[1], plain[1])
    assert float(forged[2]["special_tokens/query"]) == 0.5  # One in 2 queries.
    assert float(forged[2]["special_tokens/answer"]) == 0.5  # Two in 4 answers.
    assert float(plain[2]["special_tokens/answer"]) == 0.0
    # And so does the Solver.
    prompts = []

    def record(config, params, prompt, *args, **kwargs):
        prompts.append(np.asarray(prompt))
        raise StopIteration

    monkeypatch.setattr(step.sampling, "sample", record)
    for tokens in (forged_q, plain_q):
        with pytest.raises(StopIteration):
            step.solver_rollout(
                run.step_cfg, run.params, run.frozen, {**queries, "tokens": tokens}, None
            )
    np.testing.assert_array_equal(prompts[0], prompts[1])


def test_reward_model_head_is_float32():
    run, _ = build(**{"model.dtype": "bfloat16", "model.frozen_param_dtype": "bfloat16"})
    queries, solver, _ = rollouts(run)
    reward, _, _ = _scores(run, queries, solver["answers"])
    # Scale the score head so that rewards lie near 10, where bfloat16 steps are 1/16.
    kernel = run.frozen.rm_params["score"]["kernel"]
    scale = 10.0 / np.max(np.abs(reward))
    run.frozen = run.frozen.replace(
        rm_params={**run.frozen.rm_params, "score": {"kernel": kernel * scale}}
    )
    reward, _, _ = _scores(run, queries, solver["answers"])
    big = reward[np.abs(reward) >= 4]
    assert big.size and reward.dtype == np.float32
    off_grid = np.abs(big * 32 - np.round(big * 32)) > 1e-3
    assert off_grid.any(), reward  # Not all on bfloat16's grid (1/32 or coarser here).


def test_sampled_judge_scores_in_graph():
    run, _ = build(**{"reward.judge_mode": "sampled", "reward.judge_max_tokens": 8})
    queries, solver, _ = rollouts(run)
    _, quality, metrics = _scores(run, queries, solver["answers"])
    # The random tiny judge writes no score: every pair gets the fallback, and says so.
    assert float(metrics["judge/parse_failure_rate"]) == 1.0
    np.testing.assert_array_equal(quality, np.full((N, G), run.step_cfg.judge_fallback))
