"""The policy loss of one iteration: both roles' rows packed into a batch, their
REINFORCE losses with the KL penalty, gradients accumulated over query chunks
(`optim.grad_accum`), and per-role metrics."""

import jax
import jax.numpy as jnp

from lsp_jax import rl
from lsp_jax.model import lora
from lsp_jax.train.forward import groups_logprobs
from lsp_jax.train.state import StepConfig


def loss_batch(cfg: StepConfig, queries, solver, reference, solver_adv_NG, challenger_adv_N):
    """What the loss reads, with the query as the leading axis of every per-row array
    (so that micro-batches are whole queries with their G answers).

    Returns {'solver': {...}, 'challenger': {...} (not GRPO)}; each role holds prompt,
    prompt_mask (the Challenger's single prompt is shared, not split), tokens, mask,
    ref_logp and adv, plus 'normalizer': the whole batch's loss denominator.
    """
    n, g = cfg.num_queries, cfg.answers_per_query
    answers = solver["answers"]
    per_query = lambda x: x.reshape(n, g, *x.shape[1:])
    sol = {
        "prompt": solver["prompt"],
        "prompt_mask": solver["prompt_mask"],
        "tokens": per_query(answers.tokens_BT),
        "mask": per_query(answers.mask_BT),
        "ref_logp": per_query(reference["solver"]),
        "adv": solver_adv_NG,
    }
    batch = {"solver": sol}
    if queries.get("rows") is not None:
        prompt_1P, prompt_mask_1P, tokens_NQ, mask_NQ = queries["rows"]
        batch["challenger"] = {
            "prompt": prompt_1P,
            "prompt_mask": prompt_mask_1P,
            "tokens": tokens_NQ,
            "mask": mask_NQ,
            "ref_logp": reference["challenger"],
            "adv": challenger_adv_N,
        }
    for role in batch.values():
        role["normalizer"] = _normalizer(cfg, role["mask"])
    return batch


def _normalizer(cfg: StepConfig, mask):
    """The denominator of a role's loss over the whole batch (policy_loss's default for
    the batch), fixed before micro-batching so chunks add up to the full loss."""
    if cfg.aggregation == "sequence_sum":
        return jnp.float32(mask.reshape(-1, mask.shape[-1]).shape[0])
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _role_rows_of(role):
    """(prompt, prompt mask, tokens [rows, T], mask) of one role of a batch or chunk."""
    tokens = role["tokens"].reshape(-1, role["tokens"].shape[-1])
    return role["prompt"], role["prompt_mask"], tokens, role["mask"].reshape(tokens.shape)


def _role_loss(cfg: StepConfig, role, logp):
    """One role's loss contribution, given its log-probs [rows, T]."""
    _, _, tokens, mask = _role_rows_of(role)
    loss, _ = rl.policy_loss(
        logp,
        role["ref_logp"].reshape(tokens.shape),
        role["adv"].reshape(-1),
        mask,
        beta=cfg.beta,
        kl_estimator=cfg.kl_estimator,
        aggregation=cfg.aggregation,
        normalizer=role["normalizer"],
    )
    return loss


def _chunk_loss(cfg: StepConfig, params, chunk):
    """L_Sol + α_Ch·L_Ch of one chunk of queries (each term already divided by the
    whole batch's normalizer); aux: the chunk's log-probs per role."""
    names = [name for name in ("solver", "challenger") if name in chunk]
    # Both roles in one pass through the layers: one gradient buffer, not one per pass.
    rows = [_role_rows_of(chunk[name]) for name in names]
    logp = dict(zip(names, groups_logprobs(cfg.policy, params, rows, cfg)))
    loss = _role_loss(cfg, chunk["solver"], logp["solver"])
    if "challenger" in chunk:
        loss_ch = _role_loss(cfg, chunk["challenger"], logp["challenger"])
        loss = rl.lsp_loss(loss, loss_ch, alpha_challenger=cfg.alpha_challenger)
    return loss, logp


def loss_and_grads(cfg: StepConfig, params, batch, *, base=None):
    """(loss, log-probs per role, gradient) of the whole batch, computed over
    `cfg.update_microbatches` chunks of queries accumulated in a lax.scan: activations
    of one chunk at a time, the same gradient up to summation order. With a LoRA `base`,
    `params` are the adapters and the gradient is theirs alone."""
    full = (lambda p: p) if base is None else (lambda p: lora.combine(base, p))
    grad_fn = jax.value_and_grad(lambda p, c: _chunk_loss(cfg, full(p), c), has_aux=True)
    k = cfg.update_microbatches
    if k == 1:
        (loss, logp), grads = grad_fn(params, batch)
        return loss, logp, grads
    chunks = _split_queries(batch, k)
    shared = _shared_parts(batch)

    def body(carry, chunk):
        loss_sum, grad_sum = carry
        (loss, logp), grads = grad_fn(params, _merge(chunk, shared))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (loss_sum + loss, grad_sum), logp

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), logp = jax.lax.scan(body, (jnp.float32(0.0), zeros), chunks)
    logp = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), logp)
    return loss, logp, grads


# Per-role entries that are the same for every chunk (not split by query).
_SHARED = {"solver": ("normalizer",), "challenger": ("prompt", "prompt_mask", "normalizer")}


def _split_queries(batch, k: int):
    """Every per-query array [N, ...] -> [k, N/k, ...] (the scan's chunks)."""
    split = lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:])
    return {
        role: {name: split(x) for name, x in arrays.items() if name not in _SHARED[role]}
        for role, arrays in batch.items()
    }


def _shared_parts(batch):
    return {role: {name: batch[role][name] for name in _SHARED[role]} for role in batch}


def _merge(chunk, shared):
    return {role: {**chunk[role], **shared[role]} for role in chunk}


def role_metrics(cfg: StepConfig, role, logp):
    """policy_loss's diagnostics of one role over the whole batch (no gradient)."""
    tokens = role["tokens"].reshape(-1, role["tokens"].shape[-1])
    _, metrics = rl.policy_loss(
        jax.lax.stop_gradient(logp),
        role["ref_logp"].reshape(tokens.shape),
        role["adv"].reshape(-1),
        role["mask"].reshape(tokens.shape),
        beta=cfg.beta,
        kl_estimator=cfg.kl_estimator,
        aggregation=cfg.aggregation,
        normalizer=role["normalizer"],
    )
    return metrics
