"""What a self-play iteration carries: the train state it updates, the frozen inputs it
reads (reference and reward model, templates, a LoRA run's base), and its static options."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lsp_jax import sampling
from lsp_jax.model import LlamaConfig, lora


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
