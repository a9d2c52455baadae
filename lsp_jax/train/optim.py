"""The optax chain: clip, AdamW with a warmup + schedule, gradient accumulation, and a
guard that skips updates whose gradient (or result) is not finite."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lsp_jax.errors import UserError

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(optim, num_steps: int):
    """Warmup from 0 to `lr` over `warmup` updates, then constant / cosine / linear decay."""
    if optim.schedule not in SCHEDULES:
        raise UserError(
            f"optim.schedule={optim.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}."
        )
    num_updates = max(1, num_steps // optim.grad_accum)
    decay_steps = max(1, num_updates - optim.warmup)
    if optim.schedule == "constant":
        main = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(optim.lr, decay_steps)
    else:
        main = optax.linear_schedule(optim.lr, 0.0, decay_steps)
    if optim.warmup <= 0:
        return main
    warmup = optax.linear_schedule(0.0, optim.lr, optim.warmup)
    return optax.join_schedules([warmup, main], [optim.warmup])


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW. With grad_accum > 1, gradients of that many
    iterations are averaged and applied once (optax.MultiSteps): each iteration still
    plays one game on fresh rollouts, as the paper's gradient accumulation of 2."""
    if optim.grad_accum < 1:
        raise UserError(f"optim.grad_accum={optim.grad_accum} must be at least 1.")
    parts = []
    if optim.clip > 0:
        parts.append(optax.clip_by_global_norm(optim.clip))
    parts.append(
        optax.adamw(
            learning_rate_schedule(optim, num_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mu_dtype=_moment_dtype(optim.get("mu_dtype")),
        )
    )
    chain = optax.chain(*parts)
    if optim.grad_accum > 1:
        chain = optax.MultiSteps(chain, every_k_schedule=optim.grad_accum)
    # Outermost, so a bad iteration is not even accumulated by MultiSteps.
    return skip_nonfinite(chain)


def _moment_dtype(name):
    if name is None:
        return None
    if name not in ("float32", "bfloat16"):
        raise UserError(f"optim.mu_dtype={name!r}; choose float32, bfloat16 or None.")
    return jnp.dtype(name)


class SkipNonfiniteState(NamedTuple):
    """The wrapped optimizer's state and two int32 counters of skipped updates."""

    inner: optax.OptState
    consecutive: jax.Array  # Skipped updates since the last applied one.
    total: jax.Array  # Skipped updates in the whole run.


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Applies `inner` only when the gradient, the update and the updated parameters are
    all finite; otherwise the update is zero, `inner`'s state (Adam moments, schedule
    count) is left as it was and the skip is counted.

    Unlike optax.apply_if_finite, it never lets a non-finite update through after a
    number of skips: stopping a run that keeps diverging is the host loop's job
    (train.max_nonfinite_steps), and its parameters stay the last good ones.
    """

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        return SkipNonfiniteState(inner=inner.init(params), consecutive=zero, total=zero)

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner, params)
        finite = _all_finite(grads) & _all_finite(updates)
        if params is not None:
            # A finite update can still overflow the parameters it is added to.
            finite &= _all_finite(optax.apply_updates(params, updates))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        skipped = (~finite).astype(jnp.int32)
        new_state = SkipNonfiniteState(
            inner=keep(inner_state, state.inner),
            consecutive=jnp.where(finite, 0, state.consecutive + 1),
            total=state.total + skipped,
        )
        return updates, new_state

    return optax.GradientTransformation(init, update)


def skip_metrics(opt_state) -> dict:
    """Per-iteration metrics of the skip guard (float32 scalars, logged every iteration):
    'optim/skipped' 1 when this iteration's update was skipped, and the counters."""
    if not isinstance(opt_state, SkipNonfiniteState):
        return {}
    return {
        "optim/skipped": (opt_state.consecutive > 0).astype(jnp.float32),
        "optim/skipped_consecutive": opt_state.consecutive.astype(jnp.float32),
        "optim/skipped_total": opt_state.total.astype(jnp.float32),
    }


def consecutive_skips(opt_state) -> int:
    """Host side: how many updates in a row were skipped up to the latest iteration."""
    return int(opt_state.consecutive) if isinstance(opt_state, SkipNonfiniteState) else 0
