"""The optax chain: clip, AdamW with a warmup + schedule, gradient accumulation."""

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
        )
    )
    chain = optax.chain(*parts)
    if optim.grad_accum > 1:
        chain = optax.MultiSteps(chain, every_k_schedule=optim.grad_accum)
    return chain
