"""Micro-batched updates (train.update_microbatches): the same loss and gradient as one
batch, for every aggregation and mode; bad values refused before loading anything."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from lsp_jax.errors import UserError
from lsp_jax.train import config as config_lib
from lsp_jax.train import loss as loss_lib
from lsp_jax.train import run as run_lib
from lsp_jax.train import state as state_lib
from lsp_jax.train import step as step_lib

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")


def tiny_run(**overrides):
    config = config_lib.load_config(TINY)
    base = {"game.num_queries": 4, "game.answers_per_query": 2}
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in {**base, **overrides}.items()])
    return run_lib.build_run(config)


@pytest.fixture(scope="module")
def rollouts():
    """One iteration's rollouts, rewards and reference log-probs of the tiny LSP game."""
    run = tiny_run()
    cfg, frozen = run.step_cfg, run.frozen
    state = state_lib.init_state(run.params, run.optimizer, 0)

    def phases(state):
        k_ch, k_sol, k_judge = step_lib.phase_keys(state)
        queries = step_lib.challenger_rollout(cfg, state.params, frozen, k_ch, state.step)
        solver = step_lib.solver_rollout(cfg, state.params, frozen, queries, k_sol)
        scores = step_lib.score_answers(cfg, frozen, queries, solver["answers"], k_judge)
        reference = step_lib.reference_logprobs(cfg, frozen, queries, solver)
        return queries, solver, scores, reference

    return run, jax.jit(phases)(state)


def gradients(run, rollouts, k, **changes):
    cfg = dataclasses.replace(run.step_cfg, update_microbatches=k, **changes)
    queries, solver, (reward, quality, _), reference = rollouts
    solver_adv, challenger_adv, _ = step_lib.game_advantages(
        cfg, reward, quality, queries, solver["answers"], reference
    )
    batch = loss_lib.loss_batch(cfg, queries, solver, reference, solver_adv, challenger_adv)
    loss, logp, grads = jax.jit(lambda p, b: loss_lib.loss_and_grads(cfg, p, b))(run.params, batch)
    return float(loss), jax.tree.map(np.asarray, logp), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("k, aggregation", [(2, "sequence_sum"), (4, "token_mean")])
def test_microbatches_give_the_same_loss_and_gradient(rollouts, k, aggregation):
    run, outs = rollouts
    loss_1, logp_1, grads_1 = gradients(run, outs, 1, aggregation=aggregation)
    loss_k, logp_k, grads_k = gradients(run, outs, k, aggregation=aggregation)
    assert loss_k == pytest.approx(loss_1, abs=1e-5)
    for role in logp_1:  # Log-probs come back in the batch's row order.
        np.testing.assert_allclose(logp_k[role], logp_1[role], atol=1e-5)
    norm = max(np.abs(g).max() for g in jax.tree.leaves(grads_1))
    assert norm > 1e-3  # Not a vacuous comparison.
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_k)):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_a_chunk_is_whole_queries(rollouts):
    # With k = N every chunk holds one query and its G answers: the Challenger row of
    # query i and the Solver rows of query i stay together.
    run, outs = rollouts
    queries, solver, (reward, quality, _), reference = outs
    cfg = run.step_cfg
    sol_adv, ch_adv, _ = step_lib.game_advantages(
        cfg, reward, quality, queries, solver["answers"], reference
    )
    batch = loss_lib.loss_batch(cfg, queries, solver, reference, sol_adv, ch_adv)
    chunks = loss_lib._split_queries(batch, 4)
    assert chunks["solver"]["tokens"].shape[:3] == (4, 1, 2)
    assert chunks["challenger"]["tokens"].shape[:2] == (4, 1)
    np.testing.assert_array_equal(chunks["challenger"]["adv"][2, 0], np.asarray(ch_adv)[2])


@pytest.mark.parametrize("k", [0, 3])
def test_microbatches_must_divide_the_queries(k):
    with pytest.raises(UserError, match="update_microbatches"):
        tiny_run(**{"train.update_microbatches": k})
