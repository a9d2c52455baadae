"""Group-baseline advantages for the Solver and the Challenger (docs/algorithm.md).

N is the number of queries, G the number of answers per query. All math is float32.
"""

import jax.numpy as jnp

from lsp_jax.errors import UserError

MODES = ("lsp", "lsp_zero", "grpo")


def check_mode(mode: str) -> None:
    """Raises UserError unless `mode` is one of MODES (config key game.mode)."""
    if mode not in MODES:
        raise UserError(
            f"Unknown game mode {mode!r}. Valid modes: {', '.join(MODES)}. "
            f"Fix: set --config.game.mode to one of them."
        )


def check_group_size(G: int, mode: str) -> None:
    """Raises UserError when G answers per query are too few for a group baseline.

    Every mode subtracts the mean over a query's G answers, so with G = 1 every solver
    advantage is exactly zero and the Solver never learns.
    """
    check_mode(mode)
    if G < 2:
        raise UserError(
            f"game.answers_per_query is {G}, but mode {mode!r} needs at least 2 answers per "
            f"query: the Solver's baseline is the mean reward over a query's answers, so with "
            f"a single answer every advantage is zero. Fix: set "
            f"--config.game.answers_per_query=2 or more (the paper uses 8)."
        )


def _center(x, axis: int, normalize_std: bool, eps: float):
    """x minus its mean along `axis`, optionally divided by (sample std + eps)."""
    centered = x - jnp.mean(x, axis=axis, keepdims=True)
    if not normalize_std or x.shape[axis] < 2:
        # With one element the centered value is already 0; its sample std is undefined.
        return centered
    scale = jnp.std(x, axis=axis, keepdims=True, ddof=1) + eps
    # A constant group (scale 0 when eps = 0) keeps its zero advantages instead of 0/0.
    return centered / jnp.where(scale > 0, scale, 1.0)


def advantages(reward_NG, quality_NG=None, *, mode="lsp", normalize_std=False, eps=1e-6):
    """Solver and Challenger advantages from rewards of G answers to each of N queries.

    Modes (r_ij is the Solver's reward, c_i the Challenger's):
      'lsp':      r_ij = R_ij + Q_ij,  c_i = -mean_j R_ij + mean_j Q_ij   (quality required)
      'lsp_zero': r_ij = R_ij,         c_i = -mean_j R_ij   (quality_NG is ignored, so a step
                  may compute it for metrics)
      'grpo':     r_ij = R_ij (+ Q_ij if given), no Challenger: its advantage is all zeros.
    Solver advantage r_ij - mean_j r_ij; Challenger advantage c_i - mean_i c_i. The paper
    divides by no standard deviation; `normalize_std=True` divides each by (std + eps) of its
    group (over G per query for the Solver, over N for the Challenger). The std is the sample
    std (ddof=1), as in TRL's GRPO, which the paper's GRPO baseline used.

    Args:
      reward_NG: reward-model scores R, [N, G].
      quality_NG: reference-judge quality self-reward Q, [N, G], or None.
      mode: 'lsp', 'lsp_zero' or 'grpo'.
      normalize_std: divide by the group std (not in the paper).
      eps: added to the std before dividing.

    Returns:
      (solver_adv_NG [N, G], challenger_adv_N [N]), float32.
    """
    check_mode(mode)
    reward_NG = jnp.asarray(reward_NG, jnp.float32)  # float32: reward scores may arrive in bf16
    if quality_NG is not None:
        quality_NG = jnp.asarray(quality_NG, jnp.float32)
        if quality_NG.shape != reward_NG.shape:
            raise ValueError(
                f"quality_NG has shape {quality_NG.shape} but reward_NG has {reward_NG.shape}; "
                f"both must be [N, G] (one score per answer)."
            )
    if mode == "lsp" and quality_NG is None:
        raise UserError(
            "Mode 'lsp' needs the quality self-reward (quality_NG) from the reference judge. "
            "Fix: enable it (config reward.self_quality) or use --config.game.mode=lsp_zero."
        )
    solver_reward_NG, challenger_reward_N = role_rewards(reward_NG, quality_NG, mode=mode)
    return center_rewards(
        solver_reward_NG, challenger_reward_N, normalize_std=normalize_std, eps=eps
    )


def role_rewards(reward_NG, quality_NG=None, *, mode="lsp"):
    """(r_NG, c_N): the Solver's and the Challenger's rewards before their baselines (see
    `advantages`). V(q) = mean_j R uses the external reward R alone."""
    value_N = jnp.mean(reward_NG, axis=1)
    if mode == "lsp":
        return reward_NG + quality_NG, -value_N + jnp.mean(quality_NG, axis=1)
    if mode == "lsp_zero":
        return reward_NG, -value_N
    solver_reward_NG = reward_NG if quality_NG is None else reward_NG + quality_NG
    return solver_reward_NG, jnp.zeros_like(value_N)  # grpo: no Challenger.


def center_rewards(solver_reward_NG, challenger_reward_N, *, normalize_std=False, eps=1e-6):
    """(solver_adv_NG, challenger_adv_N): each reward minus its group mean (over a query's
    G answers; over the N queries), optionally divided by the group's std (+ eps)."""
    solver_adv_NG = _center(solver_reward_NG, 1, normalize_std, eps)
    challenger_adv_N = _center(challenger_reward_N, 0, normalize_std, eps)
    return solver_adv_NG, challenger_adv_N


def truncated_to_group_min(reward_NG, truncated_NG, axis):
    """Each truncated entry's reward replaced by the minimum over its group (`axis`): an
    unfinished query or answer never scores above any of its group (game.truncated_reward
    = group_min)."""
    low = jnp.min(reward_NG, axis=axis, keepdims=True)
    return jnp.where(truncated_NG, jnp.broadcast_to(low, reward_NG.shape), reward_NG)


def group_stats(reward_NG, *, atol=1e-6):
    """Metrics on the reward groups.

    Args:
      reward_NG: rewards of G answers to each of N queries, [N, G].
      atol: a group whose rewards span at most this much counts as zero-variance.

    Returns:
      dict of float32 scalars: 'frac_zero_variance_groups' (groups that give the Solver no
      signal), 'reward_mean', 'reward_std_within_group' (mean over queries of the sample std
      over G), 'reward_std_across_queries' (std of the per-query means).
    """
    reward_NG = jnp.asarray(reward_NG, jnp.float32)
    spread_N = jnp.max(reward_NG, axis=1) - jnp.min(reward_NG, axis=1)
    G = reward_NG.shape[1]
    within_N = jnp.std(reward_NG, axis=1, ddof=1) if G > 1 else jnp.zeros_like(spread_N)
    return {
        "frac_zero_variance_groups": jnp.mean((spread_N <= atol).astype(jnp.float32)),
        "reward_mean": jnp.mean(reward_NG),
        "reward_std_within_group": jnp.mean(within_N),
        "reward_std_across_queries": jnp.std(jnp.mean(reward_NG, axis=1)),
    }
