"""Self-play learns: with rewards whose optimum is known (tests/constructed_rewards.py),
a few dozen iterations of the real step move each mode's quantity the way its
construction says, by margins far outside the untrained policy's spread.

The policy is configs/tiny.py's random model: nearly uniform over its 512 token ids, so
every token set below starts at a rate of about 32/512 ≈ 0.06. Each test compiles one
scan of `lsp_step` iterations (the KL coefficient passed in as an argument so that one
program serves every β) and reads the per-iteration metrics and rollouts it returns.
A sign error in the advantages, the loss or the optimizer reverses at least one of the
movements checked here.

Every game is played twice: training all weights, and training only LoRA adapters
(model.lora, rank 8) on a wider random base. The base is wider because adapters change
only the layers, not the LM head: after the final RMSNorm the hidden state of a 64-wide
model cannot point at 32 chosen token rows of a random head much more than at the others
(measured: rank 8 at dim 64 leaves the rewarded rate at 0.07 after 30 iterations), while
at dim 512 the same adapters reach the optimum, as a real model's hidden state can.
"""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from lsp_jax.model import Llama, LlamaConfig
from lsp_jax.train import config as config_lib
from lsp_jax.train import run as run_lib
from lsp_jax.train.state import init_state
from lsp_jax.train.step import lsp_step
from lsp_jax.weights import tiny
from lsp_jax.weights.hf import save_hf
from tests import constructed_rewards as constructed
from tests.test_train import TINY

# Byte tokens (Latin-1 letters) that appear in none of the tiny prompt templates.
REWARDED = range(100, 132)
PENALISED = range(132, 164)
JUDGED = range(164, 196)
UNTRAINED_RATE = 32 / 512
# Fast, unoptimised XLA code: these programs run for seconds, their compile would take
# most of a test's time at the default level.
QUICK_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


def token_weights(rewarded=(), penalised=(), vocab=512):
    w = np.zeros(vocab, np.float32)
    w[list(rewarded)], w[list(penalised)] = 1.0, -1.0
    return w


def wide_base(folder, dim=512, mlp_dim=256):
    """configs/tiny.py's random policy made `dim` wide (same tokenizer, seeded init),
    written as a Hugging Face folder."""
    source = tiny.tiny_model_path("tiny-random")
    hf = json.loads((source / "config.json").read_text())
    config = LlamaConfig.from_hf_config(hf).replace(dim=dim, mlp_dim=mlp_dim)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = meta.unbox(Llama(config).init(jax.random.key(0), tokens)["params"])
    save_hf(folder, config, jax.device_get(params), overwrite=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module", params=["full", "lora"])
def variant(request, tmp_path_factory):
    """The overrides of one way to train: all weights, or rank-8 adapters."""
    if request.param == "full":
        return {}
    folder = wide_base(tmp_path_factory.mktemp("wide") / "base")
    return {"model.source": str(folder), "model.lora.rank": 8, "model.lora.alpha": 16}


def learning_config(mode, variant=(), **overrides):
    config = config_lib.load_config(TINY)
    settings = {
        **dict(variant),
        "game.mode": mode,
        "game.num_queries": 8,
        "game.answers_per_query": 4,
        "game.max_query_tokens": 8,
        "game.max_answer_tokens": 8,
        "optim.lr": 1e-2,
        **overrides,
    }
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in settings.items()])
    return config


class Game:
    """One compiled program of `iterations` self-play iterations on constructed rewards.

    play(beta, seed) -> (metrics, rollouts), each stacked over iterations."""

    def __init__(self, config, iterations, *, rm_weights=None, judge_weights=None):
        self.run = run_lib.build_run(config)
        # The judge scores as the 64-wide one whatever the reference's width.
        self.judge_value = (64 / self.run.step_cfg.reference.dim) ** 0.5
        frozen = self.run.frozen
        if rm_weights is not None:
            rm = constructed.token_rate_reward_model(self.run.step_cfg.reward_model, rm_weights)
            frozen = frozen.replace(rm_params=rm)
        if judge_weights is not None:
            # The frozen reference is the judge; the tests that use it set no KL term.
            judge = constructed.token_rate_judge(
                self.run.step_cfg.reference,
                judge_weights,
                np.asarray(frozen.templates.digit_ids),
                value=self.judge_value,
            )
            frozen = frozen.replace(ref_params=judge)
        self.frozen = frozen
        iterate = functools.partial(self._iterate, iterations=iterations)
        state = init_state(self.run.params, self.run.optimizer, 0)
        lowered = jax.jit(iterate).lower(state, frozen, jnp.float32(0))
        self._compiled = lowered.compile(QUICK_COMPILE)

    def _iterate(self, state, frozen, beta, *, iterations):
        cfg = dataclasses.replace(self.run.step_cfg, beta=beta)

        def body(state, _):
            state, metrics, rollout = lsp_step(state, frozen, cfg=cfg, optimizer=self.run.optimizer)
            return state, (metrics, rollout)

        return jax.lax.scan(body, state, None, length=iterations)[1]

    def play(self, beta=0.0, seed=0):
        state = init_state(self.run.params, self.run.optimizer, seed)
        return jax.device_get(self._compiled(state, self.frozen, jnp.float32(beta)))


def token_rate(tokens_KBL, lengths_KB, ids):
    """Per iteration, the share of the rollout's real tokens that lie in `ids`, [K]."""
    real_KBL = np.arange(tokens_KBL.shape[-1]) < lengths_KB[..., None]
    hits_KBL = np.isin(tokens_KBL, list(ids)) & real_KBL
    return hits_KBL.sum((1, 2)) / real_KBL.sum((1, 2))


def start_end(series, last=5):
    """(the untrained policy's value: iteration 0, the mean of the last iterations)."""
    series = np.asarray(series)
    return float(series[0]), float(series[-last:].mean())


@pytest.fixture(scope="module")
def grpo(variant):
    """GRPO on data prompts; the reward model pays for REWARDED tokens."""
    return Game(learning_config("grpo", variant), 30, rm_weights=token_weights(REWARDED))


def _piece(template_piece):
    return list(np.asarray(template_piece[0])[0])


def best_reward(game, rollouts):
    """The constructed reward model's optimum on the last iteration's queries: every
    answer the longest allowed run of REWARDED tokens."""
    t = game.frozen.templates
    answer = [REWARDED[0]] * game.run.step_cfg.solver.max_new_tokens
    best = [
        constructed.expected_reward(
            _piece(t.rm_prefix) + list(q[:n]) + _piece(t.rm_middle) + answer + _piece(t.rm_suffix),
            token_weights(REWARDED),
            game.run.step_cfg.reward_model,
        )
        for q, n in zip(rollouts["query_tokens"][-1], rollouts["query_lengths"][-1])
    ]
    return float(np.mean(best))


def best_quality(game):
    """The constructed judge's top score: query and answer both the longest allowed
    runs of JUDGED tokens."""
    t, cfg = game.frozen.templates, game.run.step_cfg
    query = [JUDGED[0]] * cfg.challenger.max_new_tokens
    answer = [JUDGED[0]] * cfg.solver.max_new_tokens
    tokens = _piece(t.judge_prefix) + query + _piece(t.judge_middle) + answer
    tokens += _piece(t.judge_suffix)
    return constructed.expected_judge_score(
        tokens,
        token_weights(JUDGED),
        cfg.reference,
        num_scores=len(t.digit_ids),
        value=game.judge_value,
    )


def test_constructed_reward_model_scores_as_its_formula():
    from lsp_jax.model import Llama, LlamaConfig

    config = LlamaConfig.tiny(num_labels=1)
    weights = token_weights(REWARDED, PENALISED)
    params = constructed.token_rate_reward_model(config, weights)
    rng = np.random.default_rng(0)
    tokens = rng.integers(95, 170, (4, 12))
    mask = np.arange(12)[None] >= np.array([[0], [3], [5], [9]])  # Left-padded rows.
    scores = Llama(config).apply({"params": params}, jnp.asarray(tokens), mask_BT=mask)
    from lsp_jax.model import sequence_scores

    ours = np.asarray(sequence_scores(scores, mask))[:, 0]
    want = [constructed.expected_reward(t[m], weights, config) for t, m in zip(tokens, mask)]
    np.testing.assert_allclose(ours, want, atol=1e-5)


def test_grpo_raises_the_solvers_reward_towards_its_known_optimum(grpo):
    metrics, rollouts = grpo.play(beta=0.0, seed=0)
    start, end = start_end(metrics["reward/solver"])
    best = best_reward(grpo, rollouts)
    # Untrained batches of 32 answers score 0.06..0.09 (seeds 0-7); the optimum is ~0.77.
    assert 0.0 < start < 0.15, start
    assert end > start + 0.75 * (best - start), (start, end, best)
    rate_start, rate_end = start_end(
        token_rate(rollouts["answer_tokens"], rollouts["answer_lengths"], REWARDED)
    )
    assert rate_end > 0.8 > 4 * UNTRAINED_RATE > rate_start, (rate_start, rate_end)


def test_kl_coefficient_holds_the_policy_near_the_reference(grpo):
    """Same game at β = 0, 0.1 and 1 (k3 in the loss): the learned policy's KL to the
    reference (the mean sequence log-ratio of its answers, an unbiased estimate) shrinks
    as β grows, and so does the reward it gains."""
    kl, gain = {}, {}
    for seed, beta in enumerate((0.0, 0.1, 1.0)):
        metrics, _ = grpo.play(beta=beta, seed=seed)
        kl[beta] = start_end(metrics["solver/logratio_per_sequence"])[1]
        start, end = start_end(metrics["reward/solver"])
        gain[beta] = end - start
    # Measured (seeds 0, 1): KL ≈ 40, 2.2, 0.2 nats per answer; gains 0.7, 0.2, 0.02.
    # LoRA (seeds 0-3 at each β): KL 43-48, 1.2-1.6, 0.46-0.73; gains 0.7, 0.08-0.15, ≤0.04.
    assert kl[0.0] > 4 * kl[0.1] and kl[0.1] > 1.5 * kl[1.0], kl
    assert kl[1.0] < 1.0, kl
    assert gain[0.0] > gain[0.1] + 0.2 and gain[0.1] > gain[1.0], gain


def test_lsp_zero_challenger_learns_queries_that_lower_the_reward(variant):
    """The reward model penalises PENALISED tokens anywhere in the pair, so the
    Challenger (c_i = -V(q_i)) gains by writing them into its queries. α_Ch = 4 lets the
    Challenger's gradient, not the Solver's opposite push on the same shared token
    preferences, decide the Challenger's rates."""
    game = Game(
        learning_config("lsp_zero", variant, **{"game.alpha_challenger": 4.0}),
        40,
        rm_weights=token_weights(penalised=PENALISED),
    )
    metrics, rollouts = game.play(seed=0)
    rate = token_rate(rollouts["query_tokens"], rollouts["query_lengths"], PENALISED)
    rate_start, rate_end = start_end(rate)
    # Untrained: 64 query tokens per iteration at rate 0.06 (binomial std 0.03).
    assert rate_start < 3 * UNTRAINED_RATE and rate_end > 0.6, (rate_start, rate_end)
    challenger_start, challenger_end = start_end(metrics["reward/challenger"])
    assert challenger_end > challenger_start + 0.3, (challenger_start, challenger_end)


def test_lsp_quality_term_moves_as_its_judge_is_built(variant):
    """No reward model (R = 0): the reference judge's expected score rises with the
    share of JUDGED tokens in the pair, so both the Solver (r = R_Q) and the Challenger
    (c = V_Q) gain by writing them, and the quality score climbs towards its top, 7."""
    game = Game(
        learning_config("lsp", variant, **{"reward.kind": "none", "game.alpha_challenger": 4.0}),
        30,
        judge_weights=token_weights(JUDGED),
    )
    metrics, rollouts = game.play(seed=0)
    quality_start, quality_end = start_end(metrics["quality/solver"])
    best = best_quality(game)
    # Untrained: 4.9 ± 0.1 (seeds 0, 1); a pair made only of JUDGED tokens scores ~6.97.
    assert quality_end > quality_start + 0.75 * (best - quality_start), (
        quality_start,
        quality_end,
        best,
    )
    rate = token_rate(rollouts["query_tokens"], rollouts["query_lengths"], JUDGED)
    rate_start, rate_end = start_end(rate)
    assert rate_start < 3 * UNTRAINED_RATE and rate_end > 0.6, (rate_start, rate_end)
