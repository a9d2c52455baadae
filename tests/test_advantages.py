"""Advantages of both roles against hand computations (N = 2 queries, G = 3 answers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsp_jax.errors import UserError
from lsp_jax.game.advantages import advantages, check_group_size, group_stats

# Reward-model scores R and quality self-rewards Q for 2 queries x 3 answers.
R = np.array([[1.0, 2.0, 3.0], [0.0, 3.0, 6.0]])
Q = np.array([[4.0, 2.0, 6.0], [1.0, 1.0, 1.0]])
# By hand: mean_j R = [2, 3], mean_j Q = [4, 1].
#   lsp:      r = R + Q = [[5, 4, 9], [1, 4, 7]], row means [6, 4]
#             c = -[2, 3] + [4, 1] = [2, -2], mean 0
#   lsp_zero: r = R, row means [2, 3];  c = [-2, -3], mean -2.5
SOLVER_R = [[-1.0, 0.0, 1.0], [-3.0, 0.0, 3.0]]
SOLVER_RQ = [[-1.0, -2.0, 3.0], [-3.0, 0.0, 3.0]]
EXPECTED = {
    # (mode, pass quality): (solver advantage, challenger advantage)
    ("lsp", True): (SOLVER_RQ, [2.0, -2.0]),
    ("lsp_zero", False): (SOLVER_R, [0.5, -0.5]),
    ("lsp_zero", True): (SOLVER_R, [0.5, -0.5]),  # quality ignored
    ("grpo", False): (SOLVER_R, [0.0, 0.0]),
    ("grpo", True): (SOLVER_RQ, [0.0, 0.0]),
}
# Sample stds (ddof=1), by hand: [-1,0,1] -> sqrt(2/2) = 1; [-3,0,3] -> sqrt(18/2) = 3;
# [-1,-2,3] -> sqrt(14/2) = sqrt(7); [2,-2] -> sqrt(8); [0.5,-0.5] -> sqrt(0.5).
S7 = np.sqrt(7.0)
EXPECTED_NORMALIZED = {
    ("lsp", True): (
        [[-1 / S7, -2 / S7, 3 / S7], [-1.0, 0.0, 1.0]],
        [2 / np.sqrt(8), -2 / np.sqrt(8)],
    ),
    ("lsp_zero", False): (
        [[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]],
        [0.5 / np.sqrt(0.5), -0.5 / np.sqrt(0.5)],
    ),
    ("grpo", False): ([[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]], [0.0, 0.0]),
    ("grpo", True): ([[-1 / S7, -2 / S7, 3 / S7], [-1.0, 0.0, 1.0]], [0.0, 0.0]),
}


@pytest.mark.parametrize("mode,with_quality", sorted(EXPECTED))
def test_advantages_match_hand_computation(mode, with_quality):
    solver_NG, challenger_N = advantages(R, Q if with_quality else None, mode=mode)
    want_solver, want_challenger = EXPECTED[(mode, with_quality)]
    assert solver_NG.dtype == jnp.float32 and challenger_N.dtype == jnp.float32
    np.testing.assert_allclose(solver_NG, want_solver, atol=1e-6)
    np.testing.assert_allclose(challenger_N, want_challenger, atol=1e-6)


@pytest.mark.parametrize("mode,with_quality", sorted(EXPECTED_NORMALIZED))
def test_normalized_advantages_match_hand_computation(mode, with_quality):
    quality = Q if with_quality else None
    solver_NG, challenger_N = advantages(R, quality, mode=mode, normalize_std=True, eps=0.0)
    want_solver, want_challenger = EXPECTED_NORMALIZED[(mode, with_quality)]
    np.testing.assert_allclose(solver_NG, want_solver, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(challenger_N, want_challenger, rtol=1e-6, atol=1e-6)


def test_normalize_adds_eps_and_zero_variance_group_gives_zero():
    reward_NG = np.array([[2.0, 2.0, 2.0], [0.0, 3.0, 6.0]])
    solver_NG, _ = advantages(reward_NG, mode="lsp_zero", normalize_std=True, eps=0.5)
    np.testing.assert_allclose(solver_NG[0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(solver_NG[1], np.array([-3.0, 0.0, 3.0]) / (3.0 + 0.5), rtol=1e-6)
    solver_NG, _ = advantages(reward_NG, mode="lsp_zero", normalize_std=True, eps=0.0)
    np.testing.assert_array_equal(solver_NG[0], [0.0, 0.0, 0.0])  # not 0/0


def test_bfloat16_rewards_are_computed_in_float32():
    solver_NG, challenger_N = advantages(
        jnp.asarray(R, jnp.bfloat16), jnp.asarray(Q, jnp.bfloat16), mode="lsp"
    )
    assert solver_NG.dtype == jnp.float32
    np.testing.assert_allclose(solver_NG, SOLVER_RQ, atol=1e-6)
    np.testing.assert_allclose(challenger_N, [2.0, -2.0], atol=1e-6)


def test_advantages_jit_with_static_mode():
    fn = jax.jit(advantages, static_argnames=("mode", "normalize_std"))
    solver_NG, challenger_N = fn(R, Q, mode="lsp", normalize_std=False)
    np.testing.assert_allclose(solver_NG, SOLVER_RQ, atol=1e-6)
    np.testing.assert_allclose(challenger_N, [2.0, -2.0], atol=1e-6)


def test_one_query_gives_zero_challenger_advantage_even_normalized():
    _, challenger_N = advantages(R[:1], Q[:1], mode="lsp", normalize_std=True)
    np.testing.assert_array_equal(challenger_N, [0.0])


def test_lsp_without_quality_is_a_clear_error():
    with pytest.raises(UserError, match="quality") as info:
        advantages(R, None, mode="lsp")
    assert "lsp_zero" in str(info.value)


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(UserError) as info:
        advantages(R, Q, mode="ppo")
    message = str(info.value)
    assert "'ppo'" in message
    for mode in ("lsp", "lsp_zero", "grpo"):
        assert mode in message
    assert "game.mode" in message


def test_quality_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        advantages(R, Q[:, :2], mode="lsp")


@pytest.mark.parametrize("mode", ["lsp", "lsp_zero", "grpo"])
def test_group_size_one_is_refused_with_the_fix(mode):
    with pytest.raises(UserError) as info:
        check_group_size(1, mode)
    message = str(info.value)
    assert "game.answers_per_query" in message
    assert "answers_per_query=2" in message
    check_group_size(2, mode)  # fine


def test_check_group_size_rejects_unknown_mode():
    with pytest.raises(UserError, match="Valid modes"):
        check_group_size(4, "zero")


def test_group_stats():
    reward_NG = np.array([[2.0, 2.0, 2.0], [0.0, 3.0, 6.0], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    stats = group_stats(reward_NG)
    # By hand: rows 0 and 2 are constant; sample stds [0, 3, 0, 1]; row means [2, 3, 1, 2].
    np.testing.assert_allclose(stats["frac_zero_variance_groups"], 0.5)
    np.testing.assert_allclose(stats["reward_mean"], 2.0)
    np.testing.assert_allclose(stats["reward_std_within_group"], 1.0)
    np.testing.assert_allclose(stats["reward_std_across_queries"], np.sqrt(0.5), rtol=1e-6)
