"""Where an iteration's time goes: its phases timed as separate programs.

The training iteration is one XLA program, so the host sees no boundary between its
phases. Every `train.phase_times_every` iterations the loop runs the same phase
functions of `lsp_jax.train.step` once more, each as its own jitted program, on the
current state, and times each one (compiled on first use, timed after compiling).
Nothing they return is kept: the training state is not touched. Separate programs
cannot overlap phases or share buffers as the fused iteration does, so the sum of the
phases is usually somewhat larger than the fused iteration's time; the split is what
this measures, the fused time is `time/step_s`.
"""

import functools
import time

import flax.linen as nn
import jax

from lsp_jax.train import state as state_lib
from lsp_jax.train import step as step_lib

PHASES = ("challenger", "solver", "rewards", "reference", "update")


class PhaseTimer:
    """Times the phases of `lsp_step` for a fixed StepConfig, optimizer and placement."""

    def __init__(self, step_cfg, optimizer, placement):
        self._placement = placement
        cfg = step_cfg
        self._fns = {
            "challenger": jax.jit(
                lambda state, frozen, key: step_lib.challenger_rollout(
                    cfg, _rollout_params(cfg, state, frozen), frozen, key, state.step
                )
            ),
            "solver": jax.jit(
                lambda state, frozen, queries, key: step_lib.solver_rollout(
                    cfg, _rollout_params(cfg, state, frozen), frozen, queries, key
                )
            ),
            "rewards": jax.jit(
                lambda frozen, queries, answers, key: step_lib.score_answers(
                    cfg, frozen, queries, answers, key
                )
            ),
            "reference": jax.jit(functools.partial(step_lib.reference_logprobs, cfg)),
            "update": jax.jit(
                lambda frozen, *args: step_lib.update(
                    cfg, optimizer, *args, base=frozen.base_params
                )
            ),
        }
        self._compiled = {}
        self.compile_seconds = 0.0

    def _run(self, name, *args):
        """(outputs, seconds of one execution); compiles on the first call."""
        if name not in self._compiled:
            start = time.perf_counter()
            self._compiled[name] = self._fns[name].lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(self._compiled[name](*args))
        return out, time.perf_counter() - start

    def __call__(self, state, frozen) -> dict[str, float]:
        """Seconds per phase ('time/phase/NAME_s') and each phase's share of their sum
        ('time/phase/NAME_frac')."""
        seconds = {}
        with jax.set_mesh(self._placement.mesh), nn.logical_axis_rules(self._placement.rules):
            k_challenger, k_solver, k_judge = jax.jit(step_lib.phase_keys)(state)
            queries, seconds["challenger"] = self._run("challenger", state, frozen, k_challenger)
            solver, seconds["solver"] = self._run("solver", state, frozen, queries, k_solver)
            answers = solver["answers"]
            scores, seconds["rewards"] = self._run("rewards", frozen, queries, answers, k_judge)
            reference, seconds["reference"] = self._run("reference", frozen, queries, solver)
            _, seconds["update"] = self._run(
                "update", frozen, state, queries, solver, scores, reference
            )
        total = sum(seconds.values())
        out = {f"time/phase/{name}_s": seconds[name] for name in PHASES}
        out.update({f"time/phase/{name}_frac": seconds[name] / total for name in PHASES})
        return out


def _rollout_params(cfg, state, frozen):
    return step_lib.rollout_params(cfg, state_lib.policy_params(frozen, state.params))


def summary(times: dict[str, float], fused_seconds: float) -> str:
    """One line: each phase's seconds and share, their sum and the fused iteration."""
    parts = [
        f"{name} {times[f'time/phase/{name}_s']:.1f} s ({times[f'time/phase/{name}_frac']:.0%})"
        for name in PHASES
    ]
    total = sum(times[f"time/phase/{name}_s"] for name in PHASES)
    return (
        "  phase split (separate programs): "
        + " | ".join(parts)
        + f" | sum {total:.1f} s vs fused iteration {fused_seconds:.1f} s"
    )
