"""Where the train state and the frozen inputs live on the mesh, and the compiled step."""

import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsp_jax.model import Llama, lora
from lsp_jax.runtime import sharding
from lsp_jax.train.state import Frozen, init_state
from lsp_jax.train.step import lsp_step


@dataclasses.dataclass
class Placement:
    """The mesh and the shardings of the step's arguments (pytrees of NamedSharding)."""

    mesh: jax.sharding.Mesh
    state: object
    frozen: object
    rules: tuple = ()

    @property
    def replicated(self):
        return sharding.replicated(self.mesh)


def boxed_params(model_config):
    """Abstract parameters with their logical axis names (flax LogicallyPartitioned)."""
    init = lambda: Llama(model_config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return jax.eval_shape(init)["params"]


def trained_params(model_config):
    """Abstract boxed parameters the optimizer trains: all of them, or (LoRA) the
    adapters alone."""
    params = boxed_params(model_config)
    return lora.split(params)[1] if model_config.lora.rank else params


def plan(step_cfg, optimizer, frozen, mesh, rules) -> Placement:
    """Shardings from the parameters' logical names and the config's rules table."""
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), trained_params(step_cfg.policy))
    replicated = sharding.replicated(mesh)
    shardings = lambda model_config, rules: sharding.logical_shardings(
        boxed_params(model_config), mesh, rules
    )
    # A reference that decodes (sampled judge) is stored in the rollout layout; the LoRA
    # base (also the reference when ref_params is None) in the training layout.
    ref_rules = step_cfg.rollout_rules if step_cfg.judge_decodes else rules
    frozen_sharding = Frozen(
        ref_params=None if frozen.ref_params is None else shardings(step_cfg.reference, ref_rules),
        rm_params=None
        if step_cfg.reward_model is None
        else shardings(step_cfg.reward_model, rules),
        templates=jax.tree.map(lambda _: replicated, frozen.templates),
        prompts=jax.tree.map(lambda _: replicated, frozen.prompts),
        base_params=None
        if frozen.base_params is None
        else shardings(lora.base_config(step_cfg.policy), rules),
    )
    return Placement(
        mesh=mesh,
        state=sharding.logical_shardings(state, mesh, rules),
        frozen=frozen_sharding,
        rules=tuple(rules),
    )


def place_state(params, optimizer, seed: int, placement: Placement):
    """The initial TrainState, created directly in its shardings."""
    params = jax.device_put(params, placement.state.params)
    make = jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=placement.state)
    return make(params)


def place_frozen(frozen: Frozen, placement: Placement) -> Frozen:
    return jax.device_put(frozen, placement.frozen)


def run_iterations(state, frozen, *, cfg, optimizer, num_iterations):
    """`num_iterations` self-play iterations in one program (lax.scan over lsp_step);
    metrics stacked [num_iterations], the rollout of the last iteration."""

    def body(state, _):
        state, metrics, rollout = lsp_step(state, frozen, cfg=cfg, optimizer=optimizer)
        return state, (metrics, rollout)

    state, (metrics, rollouts) = jax.lax.scan(body, state, None, length=num_iterations)
    return state, metrics, jax.tree.map(lambda x: x[-1], rollouts)


def jit_iterations(step_cfg, optimizer, placement: Placement, num_iterations: int):
    """The jitted iteration with explicit shardings; the state is donated."""
    fn = functools.partial(
        run_iterations, cfg=step_cfg, optimizer=optimizer, num_iterations=num_iterations
    )
    return jax.jit(
        fn,
        in_shardings=(placement.state, placement.frozen),
        out_shardings=(placement.state, placement.replicated, placement.replicated),
        donate_argnums=0,
    )


def compile_iterations(step_cfg, optimizer, placement, state, frozen, num_iterations):
    """(compiled step, seconds spent tracing and compiling)."""
    start = time.perf_counter()
    with jax.set_mesh(placement.mesh), nn.logical_axis_rules(placement.rules):
        lowered = jit_iterations(step_cfg, optimizer, placement, num_iterations).lower(
            state, frozen
        )
        compiled = lowered.compile()
    return compiled, time.perf_counter() - start
