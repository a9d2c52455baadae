"""Runs tiny LSP iterations on 8 fake CPU devices, one mesh after another, and prints
their metrics and parameters as JSON (run by tests/test_sharding.py in a subprocess,
since the device count is fixed when JAX starts)."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lsp_jax import sampling  # noqa: E402
from lsp_jax.runtime import checkpoint, sharding  # noqa: E402
from lsp_jax.train import config as config_lib  # noqa: E402
from lsp_jax.train import placement  # noqa: E402
from lsp_jax.train import run as run_lib  # noqa: E402
from lsp_jax.train import step as step_lib  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if len(sys.argv) > 2:
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


_COMPILED = {}  # (run, mesh shape) -> compiled iteration (a resumed run reuses it).


def one_iteration(run, mesh, state_from=None):
    rules = run_lib.mesh_rules(run.config)
    plan = placement.plan(run.step_cfg, run.optimizer, run.frozen, mesh, rules)
    frozen = placement.place_frozen(run.frozen, plan)
    state = placement.place_state(run.params, run.optimizer, 0, plan)
    if state_from is not None:
        state = checkpoint.restore(checkpoint.checkpoint_manager(state_from), state)
    key = (id(run), tuple(mesh.devices.shape))
    if key not in _COMPILED:
        _COMPILED[key] = placement.compile_iterations(
            run.step_cfg, run.optimizer, plan, state, frozen, 1
        )[0]
    state, metrics, _ = _COMPILED[key](state, frozen)
    return state, metrics, plan


def two_programs(run, mesh):
    """The same iteration as two programs (rollouts; scoring, reference and update) on
    `mesh`: the layouts and the math without the fused program (see test_sharding)."""
    cfg = run.step_cfg

    def rollouts(state, frozen):
        k_challenger, k_solver, _ = step_lib.phase_keys(state)
        policy = step_lib.rollout_params(cfg, state.params)
        queries = step_lib.challenger_rollout(cfg, policy, frozen, k_challenger, state.step)
        return queries, step_lib.solver_rollout(cfg, policy, frozen, queries, k_solver)

    def rest(state, frozen, queries, solver):
        _, _, k_judge = step_lib.phase_keys(state)
        scores = step_lib.score_answers(cfg, frozen, queries, solver["answers"], k_judge)
        reference = step_lib.reference_logprobs(cfg, frozen, queries, solver)
        return step_lib.update(cfg, run.optimizer, state, queries, solver, scores, reference)

    plan = placement.plan(cfg, run.optimizer, run.frozen, mesh, run_lib.mesh_rules(run.config))
    with jax.set_mesh(mesh), nn.logical_axis_rules(plan.rules):
        frozen = placement.place_frozen(run.frozen, plan)
        state = placement.place_state(run.params, run.optimizer, 0, plan)
        queries, solver = jax.jit(rollouts)(state, frozen)
        state, metrics, _ = jax.jit(rest)(state, frozen, queries, solver)
    return state, jax.tree.map(lambda x: np.asarray(x)[None], metrics)


def summary(state, metrics, reference=None):
    """Metrics, and the largest parameter difference to `reference` (element-wise)."""
    params = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state.params))]
    out = {
        "metrics": {k: float(np.asarray(v)[0]) for k, v in jax.device_get(metrics).items()},
        "params": params,
    }
    if reference is not None:
        diffs = [np.abs(a - b).max() for a, b in zip(params, reference["params"])]
        out["max_param_diff"] = float(max(diffs))
        moved = [np.abs(a - b).max() for a, b in zip(params, reference["start"])]
        out["max_param_change"] = float(max(moved))
    return out


def rollout_sample(run, mesh):
    """The Challenger's sampler run from FSDP-placed parameters through the rollout
    layout (as lsp_step does): tokens, log-probs, mask and the rollout q-kernel spec."""
    cfg = run.step_cfg
    plan = placement.plan(cfg, run.optimizer, run.frozen, mesh, run_lib.mesh_rules(run.config))
    prompt = np.asarray(run.frozen.templates.challenger_prompt)[None]
    sampler = cfg.challenger.replace(max_new_tokens=12)

    def fn(params, key):
        params = step_lib.rollout_params(cfg, params)
        with step_lib.rollout_layout(cfg):
            out = sampling.sample(
                cfg.policy, params, prompt, np.ones(prompt.shape, bool), key, sampler, group_size=8
            )
        return out.tokens_BT, out.logprobs_BT, out.mask_BT, params

    with jax.set_mesh(mesh), nn.logical_axis_rules(plan.rules):
        params = jax.device_put(run.params, plan.state.params)
        tokens, logprobs, mask, rollout_params = jax.jit(fn)(params, jax.random.key(7))
    q = rollout_params["layers_0"]["attn"]["q"]
    q_spec = list(q.sharding.spec) + [None] * (q.ndim - len(q.sharding.spec))
    return {
        "tokens": np.asarray(tokens).tolist(),
        "logprobs": np.asarray(logprobs).tolist(),
        "mask": np.asarray(mask).tolist(),
        "q_spec": q_spec,
    }


def main(workdir):
    config = config_lib.load_config(TINY)
    # Adam's first step is lr * g / (|g| + eps): for eps << |g| it is ~lr * sign(g) and
    # amplifies float noise in tiny gradients. A large eps makes the update linear in
    # the gradient, so comparing parameters compares the gradients the meshes computed.
    config_lib.apply_overrides(
        config,
        ["game.num_queries=4", "game.answers_per_query=2", "optim.eps=1.0", "optim.lr=0.1"],
    )
    run = run_lib.build_run(config)
    run.config = config
    results = {}
    single = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    start = [np.asarray(x, np.float64) for x in jax.tree.leaves(run.params)]
    state, metrics, _ = one_iteration(run, single)
    results["1x1x1"] = summary(state, metrics)
    results["1x1x1"]["start"] = start
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)]:
        mesh = sharding.make_mesh(shape)
        state, metrics, plan = one_iteration(run, mesh)
        results["x".join(map(str, shape))] = summary(state, metrics, results["1x1x1"])
        if shape == (1, 8, 1):
            # Save on (1, 8, 1), restore onto (2, 2, 2), and continue one iteration.
            manager = checkpoint.checkpoint_manager(workdir)
            checkpoint.save(manager, 1, state)
            checkpoint.finish(manager)
            fsdp_spec = str(plan.state.params["embed"]["embedding"].spec)
            results["fsdp_embedding_spec"] = fsdp_spec
    state, metrics = two_programs(run, sharding.make_mesh((2, 2, 2)))
    results["two_programs_2x2x2"] = summary(state, metrics, results["1x1x1"])
    for shape in [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)]:
        devices = jax.devices() if shape != (1, 1, 1) else jax.devices()[:1]
        mesh = sharding.make_mesh(shape, devices=devices)
        results["sample_" + "x".join(map(str, shape))] = rollout_sample(run, mesh)
    # Micro-batched update (2 chunks of 2 queries) on (2, 2, 2) = one batch on one device.
    micro = config_lib.load_config(TINY)
    config_lib.apply_overrides(
        micro,
        [
            "game.num_queries=4",
            "game.answers_per_query=2",
            "optim.eps=1.0",
            "optim.lr=0.1",
            "train.update_microbatches=2",
        ],
    )
    micro_run = run_lib.build_run(micro)
    micro_run.config = micro
    state, metrics, _ = one_iteration(micro_run, sharding.make_mesh((2, 2, 2)))
    results["micro2_2x2x2"] = summary(state, metrics, results["1x1x1"])
    for name, mesh_shape in [("resumed_111", (1, 1, 1)), ("resumed_222", (2, 2, 2))]:
        devices = jax.devices() if name == "resumed_222" else jax.devices()[:1]
        mesh = sharding.make_mesh(mesh_shape, devices=devices)
        state, metrics, _ = one_iteration(run, mesh, state_from=workdir)
        reference = results.get("resumed_111")
        if reference is not None:
            reference = dict(reference, start=results["1x8x1"]["params"])
        results[name] = summary(state, metrics, reference)
    try:
        sharding.check_batch_divisible(
            sharding.make_mesh((8, 1, 1)), num_queries=3, answers_per_query=2
        )
    except Exception as error:  # noqa: BLE001
        results["uneven_error"] = str(error)
    for value in results.values():
        if isinstance(value, dict):
            value.pop("params", None)
            value.pop("start", None)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
