"""Loss math against numpy and hand-derived values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsp_jax import rl
from lsp_jax.errors import UserError
from lsp_jax.game.advantages import advantages

ESTIMATORS = ["k1", "k2", "k3"]
AGGREGATIONS = ["sequence_sum", "token_mean"]


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def np_kl(d, estimator):
    """The three estimators written out, d = logp - ref_logp (float64)."""
    return {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1.0}[estimator]


# ---------------------------------------------------------------- log-probs and entropy


def test_token_logprobs_is_a_log_softmax_gather():
    rng = np.random.default_rng(0)
    logits_BTV = rng.normal(size=(2, 3, 7)) * 3
    targets_BT = rng.integers(0, 7, size=(2, 3))
    for temperature in (1.0, 0.7):
        got = rl.token_logprobs(
            jnp.asarray(logits_BTV, jnp.float32), targets_BT, temperature=temperature
        )
        want = np.take_along_axis(
            np_log_softmax(logits_BTV / temperature), targets_BT[..., None], -1
        )[..., 0]
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_of_bfloat16_logits_are_float32():
    rng = np.random.default_rng(1)
    logits_BTV = jnp.asarray(rng.normal(size=(1, 2, 5)), jnp.bfloat16)
    targets_BT = np.array([[0, 4]])
    got = rl.token_logprobs(logits_BTV, targets_BT)
    want = np.take_along_axis(
        np_log_softmax(np.asarray(logits_BTV, np.float64)), targets_BT[..., None], -1
    )[..., 0]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_token_entropy():
    rng = np.random.default_rng(2)
    logits_BTV = rng.normal(size=(2, 3, 6)) * 2
    logp_BTV = np_log_softmax(logits_BTV)
    want = -(np.exp(logp_BTV) * logp_BTV).sum(-1)
    np.testing.assert_allclose(
        rl.token_entropy(jnp.asarray(logits_BTV, jnp.float32)), want, rtol=1e-5
    )
    uniform = rl.token_entropy(jnp.zeros((1, 1, 8)))
    np.testing.assert_allclose(uniform, [[np.log(8.0)]], rtol=1e-6)


@pytest.mark.parametrize("layout", ["VD", "DV"])
def test_chunked_logprobs_equal_unchunked_in_value_and_gradient(layout):
    rng = np.random.default_rng(3)
    B, T, D, V = 2, 7, 5, 11
    hidden_BTD = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    embed_VD = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    unembed = embed_VD if layout == "VD" else embed_VD.T
    targets_BT = jnp.asarray(rng.integers(0, V, size=(B, T)))
    weights_BT = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)

    def full(hidden_BTD, unembed):
        logits_BTV = jnp.einsum("BTD,VD->BTV", hidden_BTD, unembed if layout == "VD" else unembed.T)
        return rl.token_logprobs(logits_BTV, targets_BT, temperature=0.8), rl.token_entropy(
            logits_BTV, temperature=0.8
        )

    def chunked(hidden_BTD, unembed):
        return rl.chunked_token_logprobs(
            hidden_BTD,
            unembed,
            targets_BT,
            layout=layout,
            chunk=3,
            temperature=0.8,
            return_entropy=True,
        )

    for got, want in zip(chunked(hidden_BTD, unembed), full(hidden_BTD, unembed)):
        assert got.shape == (B, T)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    only_logp = rl.chunked_token_logprobs(
        hidden_BTD, unembed, targets_BT, layout=layout, chunk=3, temperature=0.8
    )
    np.testing.assert_allclose(only_logp, full(hidden_BTD, unembed)[0], rtol=1e-5, atol=1e-5)

    scalar = lambda fn: lambda h, u: jnp.sum(fn(h, u)[0] * weights_BT)
    got_grads = jax.jit(jax.grad(scalar(chunked), argnums=(0, 1)))(hidden_BTD, unembed)
    want_grads = jax.grad(scalar(full), argnums=(0, 1))(hidden_BTD, unembed)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- KL estimators


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_estimator_formula(estimator):
    logp = np.array([-0.1, -2.0, -5.0, -0.7, -3.0])
    ref_logp = np.array([-0.1, -1.0, -0.5, -2.7, -3.5])
    got = rl.kl_penalty(
        jnp.asarray(logp, jnp.float32), jnp.asarray(ref_logp, jnp.float32), estimator
    )
    # By hand: d = [0, -1, -4.5, 2, 0.5]
    d = np.array([0.0, -1.0, -4.5, 2.0, 0.5])
    want = {
        "k1": d,
        "k2": [0.0, 0.5, 10.125, 2.0, 0.125],
        "k3": [0.0, np.exp(1.0) - 2.0, np.exp(4.5) - 5.5, np.exp(-2.0) + 1.0, np.exp(-0.5) - 0.5],
    }[estimator]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_k3_is_nonnegative():
    d = jnp.linspace(-20.0, 20.0, 401)
    assert bool(jnp.all(rl.kl_penalty(d, jnp.zeros_like(d), "k3") >= 0.0))


def test_k1_and_k3_are_unbiased_for_kl_by_exact_summation():
    p_V = np.array([0.1, 0.2, 0.3, 0.4])
    ref_V = np.array([0.25, 0.25, 0.4, 0.1])
    kl = float(np.sum(p_V * np.log(p_V / ref_V)))
    for estimator in ("k1", "k3"):
        values_V = rl.kl_penalty(jnp.log(p_V), jnp.log(ref_V), estimator)
        np.testing.assert_allclose(np.sum(p_V * np.asarray(values_V)), kl, rtol=1e-5)


def test_expected_gradient_of_each_estimator_by_exact_summation():
    """Under sampling from p = softmax(z): grad E[k1] = 0, grad E[k2] = grad KL(p||ref),
    grad E[k3] = p - ref = grad KL(ref||p), the sample held fixed (score-function terms only)."""
    z_V = jnp.array([0.3, -1.0, 0.5, 1.2])
    ref_V = np.array([0.25, 0.25, 0.4, 0.1])
    p_V = np.exp(np_log_softmax(np.asarray(z_V)))
    tokens_V = jnp.arange(4)

    def expected(z_V, estimator):
        logp_V = jax.nn.log_softmax(z_V)[tokens_V]
        weights_V = jax.lax.stop_gradient(jnp.exp(logp_V))  # expectation over the samples
        return jnp.sum(weights_V * rl.kl_penalty(logp_V, jnp.log(ref_V), estimator))

    np.testing.assert_allclose(jax.grad(expected)(z_V, "k1"), np.zeros(4), atol=1e-6)
    # d/dz KL(p||ref) = p * (log(p/ref) - KL)
    log_ratio_V = np.log(p_V / ref_V)
    want_k2 = p_V * (log_ratio_V - np.sum(p_V * log_ratio_V))
    np.testing.assert_allclose(jax.grad(expected)(z_V, "k2"), want_k2, atol=1e-6)
    np.testing.assert_allclose(jax.grad(expected)(z_V, "k3"), p_V - ref_V, atol=1e-6)


def test_unknown_estimator_names_the_valid_ones():
    with pytest.raises(UserError) as info:
        rl.kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")
    message = str(info.value)
    assert "'k4'" in message and "k1, k2, k3" in message and "loss.kl_estimator" in message


def test_kl_in_reward():
    reward_NG = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    logratio_NG = jnp.array([[0.5, -1.0], [2.0, 0.0]])
    got = rl.kl_in_reward(reward_NG, logratio_NG, 0.1)
    np.testing.assert_allclose(got, [[0.95, 2.1], [2.8, 4.0]], rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(rl.kl_in_reward(reward_NG, x, 0.1)))(logratio_NG)
    np.testing.assert_array_equal(grad, np.zeros((2, 2)))


def test_sequence_logratio_is_a_masked_sum():
    logp_BT = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    ref_BT = jnp.array([[-1.5, -1.0, -90.0], [-0.3, -2.0, -1.0]])
    mask_BT = jnp.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_allclose(
        rl.sequence_logratio(logp_BT, ref_BT, mask_BT), [-0.5, -2.2], rtol=1e-6
    )


# ---------------------------------------------------------------- policy loss values

LOGP_BT = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
REF_BT = np.array([[-1.5, -1.0, -0.5], [-0.3, -2.0, -1.0]])
MASK_BT = np.array([[1, 1, 0], [1, 1, 1]])
ADV_B = np.array([2.0, -1.0])
BETA = 0.1
# By hand: d = [[0.5, -1, (masked)], [0, 0.8, -3]]; 5 tokens.
D_MASKED = [[0.5, -1.0], [0.0, 0.8, -3.0]]


def hand_loss(estimator, aggregation):
    if estimator == "in_reward":  # no KL term in the loss
        kl_b = [0.0, 0.0]
    else:
        kl_b = [np.sum(np_kl(np.array(d), estimator)) for d in D_MASKED]
    if aggregation == "sequence_sum":
        return -np.mean([ADV_B[0] - BETA * kl_b[0], ADV_B[1] - BETA * kl_b[1]])
    # token_mean: each token contributes A_b; sum of A over tokens = 2*2 + 3*(-1) = 1.
    return -(1.0 - BETA * (kl_b[0] + kl_b[1])) / 5.0


def test_hand_loss_for_k1_sequence_sum_spelled_out():
    # kl per sequence = [-0.5, -2.2]; objective = [2 + 0.05, -1 + 0.22]; loss = -(2.05 - 0.78) / 2
    assert np.isclose(hand_loss("k1", "sequence_sum"), -0.635)
    # token_mean: -(1 - 0.1 * (-2.7)) / 5
    assert np.isclose(hand_loss("k1", "token_mean"), -0.254)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS + ["in_reward"])
def test_policy_loss_value(estimator, aggregation):
    loss, metrics = rl.policy_loss(
        jnp.asarray(LOGP_BT, jnp.float32),
        jnp.asarray(REF_BT, jnp.float32),
        jnp.asarray(ADV_B, jnp.float32),
        jnp.asarray(MASK_BT),
        beta=BETA,
        kl_estimator=estimator,
        aggregation=aggregation,
    )
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, hand_loss(estimator, aggregation), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss)
    monitored = "k1" if estimator == "in_reward" else estimator
    kl_b = [np.sum(np_kl(np.array(d), monitored)) for d in D_MASKED]
    np.testing.assert_allclose(metrics["kl_per_sequence"], np.mean(kl_b), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_per_token"], np.sum(kl_b) / 5.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["logratio_per_sequence"], (-0.5 - 2.2) / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["logp_per_token"], (-3.0 - 5.5) / 5, rtol=1e-5)
    np.testing.assert_allclose(metrics["tokens_per_sequence"], 2.5)
    np.testing.assert_allclose(metrics["num_tokens"], 5.0)


def test_policy_loss_inputs_in_bfloat16_give_float32():
    loss, _ = rl.policy_loss(
        jnp.asarray(LOGP_BT, jnp.bfloat16),
        jnp.asarray(REF_BT, jnp.bfloat16),
        jnp.asarray(ADV_B, jnp.bfloat16),
        jnp.asarray(MASK_BT),
        beta=BETA,
    )
    assert loss.dtype == jnp.float32
    # The inputs themselves are rounded to bf16 (8 mantissa bits), hence the tolerance.
    np.testing.assert_allclose(loss, hand_loss("k3", "sequence_sum"), rtol=1e-2)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_padding_with_extreme_logprobs_stays_finite(aggregation):
    # Unmasked, k3 would be exp(1e4) = inf at the padded position, and its gradient NaN.
    logp_BT = jnp.array([[-1.0, -1e4], [-0.5, -0.5]])
    ref_BT = jnp.array([[-1.0, 0.0], [-0.4, -0.6]])
    mask_BT = jnp.array([[1, 0], [1, 1]])
    adv_B = jnp.array([1.0, -1.0])
    fn = lambda lp: rl.policy_loss(lp, ref_BT, adv_B, mask_BT, beta=0.1, aggregation=aggregation)
    loss, grad = jax.value_and_grad(lambda lp: fn(lp)[0])(logp_BT)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert grad[0, 1] == 0.0


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_normalizer_makes_micro_batches_add_up(aggregation):
    args = [jnp.asarray(x, jnp.float32) for x in (LOGP_BT, REF_BT, ADV_B, MASK_BT)]
    full, _ = rl.policy_loss(*args, beta=BETA, aggregation=aggregation)
    total = 2.0 if aggregation == "sequence_sum" else 5.0
    halves = [
        rl.policy_loss(
            *[x[i : i + 1] for x in args], beta=BETA, aggregation=aggregation, normalizer=total
        )[0]
        for i in range(2)
    ]
    np.testing.assert_allclose(halves[0] + halves[1], full, rtol=1e-6)


def test_loss_option_errors_name_the_fix():
    args = [jnp.asarray(x, jnp.float32) for x in (LOGP_BT, REF_BT, ADV_B, MASK_BT)]
    with pytest.raises(UserError) as info:
        rl.policy_loss(*args, beta=BETA, kl_estimator="k5")
    assert "in_reward" in str(info.value) and "loss.kl_estimator" in str(info.value)
    with pytest.raises(UserError) as info:
        rl.policy_loss(*args, beta=BETA, aggregation="mean")
    message = str(info.value)
    assert "sequence_sum" in message and "token_mean" in message and "loss.aggregation" in message


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\[B\]"):
        rl.policy_loss(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3), jnp.ones((2, 3)), beta=0.1
        )


# ---------------------------------------------------------------- policy loss gradients

# A two-token policy with no context: position t samples from softmax(z_TV[t]), V = 4.
Z_TV = np.array([[0.2, -0.5, 1.0, 0.1], [-1.0, 0.3, 0.0, 0.8]])
ZREF_TV = np.array([[0.0, 0.0, 0.5, -0.2], [0.4, -0.3, 0.1, 0.2]])
TOKENS_BT = np.array([[2, 3], [0, 1], [2, 1]])
GRAD_MASK_BT = np.array([[1, 1], [1, 0], [1, 1]])
GRAD_ADV_B = np.array([1.5, -0.5, -1.0])


def hand_gradient(estimator, aggregation, beta):
    """d loss / d z by hand: d logp_bt / d z_t = onehot(y_bt) - p_t, and per token
    d loss / d logp_bt = -(m_bt / normalizer) * (A_b - beta * g(d_bt)), where g is the
    estimator's derivative in d: k1 -> 1, k2 -> d, k3 -> 1 - exp(-d), in_reward -> 0."""
    logp_TV, ref_TV = np_log_softmax(Z_TV), np_log_softmax(ZREF_TV)
    p_TV = np.exp(logp_TV)
    normalizer = 3.0 if aggregation == "sequence_sum" else GRAD_MASK_BT.sum()
    grad_TV = np.zeros_like(Z_TV)
    for b in range(3):
        for t in range(2):
            y = TOKENS_BT[b, t]
            d = logp_TV[t, y] - ref_TV[t, y]
            g = {"k1": 1.0, "k2": d, "k3": 1.0 - np.exp(-d), "in_reward": 0.0}[estimator]
            weight = -GRAD_MASK_BT[b, t] / normalizer * (GRAD_ADV_B[b] - beta * g)
            grad_TV[t] += weight * (np.eye(4)[y] - p_TV[t])
    return grad_TV


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS + ["in_reward"])
def test_policy_loss_gradient_matches_reinforce_plus_kl_by_hand(estimator, aggregation):
    beta = 0.3
    tokens_BT = jnp.asarray(TOKENS_BT)
    broadcast = lambda z_TV: jnp.broadcast_to(z_TV, (3, 2, 4))
    ref_logp_BT = rl.token_logprobs(broadcast(jnp.asarray(ZREF_TV, jnp.float32)), tokens_BT)

    def loss_fn(z_TV):
        logp_BT = rl.token_logprobs(broadcast(z_TV), tokens_BT)
        return rl.policy_loss(
            logp_BT,
            ref_logp_BT,
            jnp.asarray(GRAD_ADV_B, jnp.float32),
            jnp.asarray(GRAD_MASK_BT),
            beta=beta,
            kl_estimator=estimator,
            aggregation=aggregation,
        )[0]

    grad_TV = jax.grad(loss_fn)(jnp.asarray(Z_TV, jnp.float32))
    np.testing.assert_allclose(
        grad_TV, hand_gradient(estimator, aggregation, beta), rtol=1e-5, atol=1e-6
    )


def test_policy_loss_under_jit_matches_eager():
    args = [jnp.asarray(x, jnp.float32) for x in (LOGP_BT, REF_BT, ADV_B, MASK_BT)]
    fn = jax.jit(rl.policy_loss, static_argnames=("kl_estimator", "aggregation"))
    loss, _ = fn(*args, beta=jnp.float32(BETA), kl_estimator="k2", aggregation="token_mean")
    np.testing.assert_allclose(loss, hand_loss("k2", "token_mean"), rtol=1e-5)


# ---------------------------------------------------------------- the whole LSP loss, N=2, G=3

R_NG = np.array([[1.0, 2.0, 3.0], [0.0, 3.0, 6.0]])
Q_NG = np.array([[4.0, 2.0, 6.0], [1.0, 1.0, 1.0]])
# Advantages by hand (see tests/test_advantages.py): solver r - row mean, challenger c - mean c.
HAND_ADV = {
    "lsp": ([-1.0, -2.0, 3.0, -3.0, 0.0, 3.0], [2.0, -2.0]),
    "lsp_zero": ([-1.0, 0.0, 1.0, -3.0, 0.0, 3.0], [0.5, -0.5]),
    "grpo": ([-1.0, 0.0, 1.0, -3.0, 0.0, 3.0], [0.0, 0.0]),
}
# Answer log-probs: 6 answers x 2 tokens; query log-probs: 2 queries x 2 tokens (all valid).
ANS_LOGP = np.array(
    [[-1.0, -0.5], [-2.0, -0.1], [-0.2, -0.3], [-1.1, -0.4], [-0.6, -0.9], [-0.7, -1.3]]
)
ANS_REF = np.array(
    [[-1.2, -0.5], [-1.0, -0.6], [-0.2, -0.1], [-1.0, -0.4], [-0.9, -0.9], [-0.5, -1.0]]
)
QRY_LOGP = np.array([[-0.5, -1.5], [-2.5, -0.2]])
QRY_REF = np.array([[-0.7, -1.0], [-2.0, -0.4]])


@pytest.mark.parametrize("mode", ["lsp", "lsp_zero", "grpo"])
def test_lsp_loss_for_n2_g3_matches_hand_computation(mode):
    beta, alpha = 0.05, 0.5
    solver_NG, challenger_N = advantages(R_NG, Q_NG if mode != "lsp_zero" else None, mode=mode)
    terms = {}
    for role, logp, ref, adv in (
        ("solver", ANS_LOGP, ANS_REF, solver_NG.reshape(-1)),
        ("challenger", QRY_LOGP, QRY_REF, challenger_N),
    ):
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        terms[role] = rl.policy_loss(f32(logp), f32(ref), adv, jnp.ones(logp.shape), beta=beta)[0]
    total = rl.lsp_loss(terms["solver"], terms["challenger"], alpha_challenger=alpha)

    want_solver_adv, want_challenger_adv = HAND_ADV[mode]
    k3 = lambda lp, rf: np.sum(np_kl(lp - rf, "k3"), axis=-1)
    want_solver = -np.mean(np.array(want_solver_adv) - beta * k3(ANS_LOGP, ANS_REF))
    want_challenger = -np.mean(np.array(want_challenger_adv) - beta * k3(QRY_LOGP, QRY_REF))
    np.testing.assert_allclose(terms["solver"], want_solver, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms["challenger"], want_challenger, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, want_solver + alpha * want_challenger, rtol=1e-5, atol=1e-6)
