"""KL estimators and the REINFORCE-with-KL policy loss of LSP (docs/algorithm.md, "The loss").

B sequences, T tokens. All math is float32 whatever the input dtype.
"""

import jax
import jax.numpy as jnp

from lsp_jax.errors import UserError

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_KL_ESTIMATORS = KL_ESTIMATORS + ("in_reward",)
AGGREGATIONS = ("sequence_sum", "token_mean")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def check_loss_options(kl_estimator: str, aggregation: str) -> None:
    """Raises UserError for an unknown loss.kl_estimator or loss.aggregation."""
    if kl_estimator not in LOSS_KL_ESTIMATORS:
        raise UserError(
            f"Unknown KL estimator {kl_estimator!r}. Valid: {', '.join(LOSS_KL_ESTIMATORS)}. "
            f"Fix: set --config.loss.kl_estimator to one of them."
        )
    if aggregation not in AGGREGATIONS:
        raise UserError(
            f"Unknown loss aggregation {aggregation!r}. Valid: {', '.join(AGGREGATIONS)}. "
            f"Fix: set --config.loss.aggregation to one of them."
        )


def kl_penalty(logp, ref_logp, estimator):
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    With d = logp - ref_logp: 'k1' d (unbiased, can be negative), 'k2' d^2 / 2 (biased,
    >= 0), 'k3' exp(-d) + d - 1 (unbiased, >= 0). As a loss term, k1 has zero expected
    gradient, k2's gradient is that of KL(pi || pi_ref), and k3's that of KL(pi_ref || pi).

    Args:
      logp, ref_logp: same-shaped arrays of log-probs under the policy and the reference.
      estimator: 'k1', 'k2' or 'k3'.

    Returns:
      float32 array of the same shape.
    """
    if estimator not in KL_ESTIMATORS:
        raise UserError(
            f"Unknown KL estimator {estimator!r} for kl_penalty. Valid: "
            f"{', '.join(KL_ESTIMATORS)} ('in_reward' is applied with kl_in_reward instead). "
            f"Fix: set --config.loss.kl_estimator to one of them."
        )
    d = _f32(logp) - _f32(ref_logp)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    return jnp.exp(-d) + d - 1.0


def sequence_logratio(logp_BT, ref_logp_BT, mask_BT):
    """log pi(y_b) - log pi_ref(y_b) per sequence: the masked sum over tokens, [B] float32."""
    mask_BT = _f32(mask_BT) > 0
    d_BT = jnp.where(mask_BT, _f32(logp_BT) - _f32(ref_logp_BT), 0.0)
    return jnp.sum(d_BT, axis=-1)


def kl_in_reward(reward, seq_logratio, beta):
    """reward - beta * stop_gradient(seq_logratio): the 'in_reward' KL (before advantages).

    Args:
      reward: rewards, any shape, e.g. [N, G].
      seq_logratio: same shape, sequence_logratio of each rewarded sequence.
      beta: KL coefficient.
    """
    return _f32(reward) - beta * jax.lax.stop_gradient(_f32(seq_logratio))


def policy_loss(
    logp_BT,
    ref_logp_BT,
    adv_B,
    mask_BT,
    *,
    beta,
    kl_estimator="k3",
    aggregation="sequence_sum",
    normalizer=None,
):
    """REINFORCE through a stop-gradient ratio, minus beta times a KL estimate.

    'sequence_sum' (the paper): with S_b = sum_t m_bt logp_bt,
      objective_b = exp(S_b - sg(S_b)) * A_b - beta * sum_t m_bt kl_bt,  loss = -mean_b objective_b
    'token_mean':
      loss = -sum_bt m_bt [exp(logp_bt - sg(logp_bt)) * A_b - beta * kl_bt] / max(sum m, 1)
    The ratios equal 1 in value and carry the gradient of log pi. With kl_estimator
    'in_reward' there is no KL term here (apply kl_in_reward to the rewards instead).
    Masked positions get d = 0 before the KL, so padding can never produce inf or NaN.

    Args:
      logp_BT: [B, T] policy log-probs of the sampled tokens (differentiable).
      ref_logp_BT: [B, T] reference log-probs (treated as constants).
      adv_B: [B] advantages (treated as constants).
      mask_BT: [B, T] 1 for the tokens whose probability is optimized, 0 elsewhere.
      beta: KL coefficient.
      kl_estimator: 'k1', 'k2', 'k3' or 'in_reward'.
      aggregation: 'sequence_sum' or 'token_mean'.
      normalizer: divide by this instead of B ('sequence_sum') or max(sum m, 1)
        ('token_mean'); pass the whole batch's count when micro-batching.

    Returns:
      (loss, metrics): loss a float32 scalar; metrics a dict of float32 scalars.
    """
    check_loss_options(kl_estimator, aggregation)
    if logp_BT.shape != ref_logp_BT.shape or logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"logp_BT {logp_BT.shape}, ref_logp_BT {ref_logp_BT.shape} and mask_BT "
            f"{mask_BT.shape} must all be [B, T]."
        )
    if adv_B.shape != logp_BT.shape[:1]:
        raise ValueError(f"adv_B has shape {adv_B.shape}; expected [B] = {logp_BT.shape[:1]}.")
    valid_BT = _f32(mask_BT) > 0
    m_BT = valid_BT.astype(jnp.float32)
    logp_BT = jnp.where(valid_BT, _f32(logp_BT), 0.0)
    ref_logp_BT = jnp.where(valid_BT, jax.lax.stop_gradient(_f32(ref_logp_BT)), 0.0)
    adv_B = jax.lax.stop_gradient(_f32(adv_B))
    monitor = "k1" if kl_estimator == "in_reward" else kl_estimator
    kl_BT = kl_penalty(logp_BT, ref_logp_BT, monitor) * m_BT
    kl_coef = 0.0 if kl_estimator == "in_reward" else beta
    num_tokens = jnp.sum(m_BT)
    if aggregation == "sequence_sum":
        seq_logp_B = jnp.sum(logp_BT, axis=-1)
        ratio_B = jnp.exp(seq_logp_B - jax.lax.stop_gradient(seq_logp_B))
        objective_B = ratio_B * adv_B - kl_coef * jnp.sum(kl_BT, axis=-1)
        denominator = adv_B.shape[0] if normalizer is None else normalizer
        objective = jnp.sum(objective_B) / denominator
    else:
        ratio_BT = jnp.exp(logp_BT - jax.lax.stop_gradient(logp_BT))
        objective_BT = m_BT * (ratio_BT * adv_B[:, None] - kl_coef * kl_BT)
        denominator = jnp.maximum(num_tokens, 1.0) if normalizer is None else normalizer
        objective = jnp.sum(objective_BT) / denominator
    loss = -objective
    return loss, _loss_metrics(loss, logp_BT, ref_logp_BT, kl_BT, m_BT, adv_B)


def _loss_metrics(loss, logp_BT, ref_logp_BT, kl_BT, m_BT, adv_B):
    """Scalar diagnostics of one policy_loss call (no gradients flow through them)."""
    sg = jax.lax.stop_gradient
    num_tokens = jnp.sum(m_BT)
    per_token = lambda x_BT: jnp.sum(sg(x_BT)) / jnp.maximum(num_tokens, 1.0)
    return {
        "loss": sg(loss),
        "kl_per_token": per_token(kl_BT),
        "kl_per_sequence": jnp.mean(jnp.sum(sg(kl_BT), axis=-1)),
        "logratio_per_sequence": jnp.mean(jnp.sum(sg(logp_BT - ref_logp_BT), axis=-1)),
        "logp_per_token": per_token(logp_BT),
        "logp_per_sequence": jnp.mean(jnp.sum(sg(logp_BT), axis=-1)),
        "advantage_mean": jnp.mean(adv_B),
        "advantage_abs_mean": jnp.mean(jnp.abs(adv_B)),
        "tokens_per_sequence": jnp.mean(jnp.sum(m_BT, axis=-1)),
        "num_tokens": num_tokens,
    }


def lsp_loss(solver_loss, challenger_loss, *, alpha_challenger):
    """L = L_Sol + alpha_Ch * L_Ch, the one loss both roles' gradients come from (float32)."""
    return _f32(solver_loss) + alpha_challenger * _f32(challenger_loss)
