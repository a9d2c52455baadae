"""FLOPs of a Llama forward/backward pass, of generation, and of a self-play iteration,
counted by hand: XLA's cost_analysis() counts a loop body once (scanned layers, decode
while-loops), so the numbers that matter cannot be read from it."""

import numpy as np


def matmul_params(config) -> int:
    """Weights every token multiplies by in the transformer blocks (no embedding, no head):
    L · (D·N·H + 2·D·K·H + N·H·D + 3·D·F)."""
    c = config
    attention = c.dim * c.num_heads * c.head_dim * 2 + 2 * c.dim * c.num_kv_heads * c.head_dim
    return c.num_layers * (attention + 3 * c.dim * c.mlp_dim)


def head_params(config) -> int:
    """D·V for a language model (tied or not), D·C for a sequence classifier."""
    return config.dim * (config.num_labels if config.is_classifier else config.vocab_size)


def llama_flops(config, num_tokens, *, context=0, head_tokens=None, training=True) -> float:
    """FLOPs of pushing `num_tokens` tokens through a Llama (multiply-add = 2 FLOPs).

    forward = 2 · matmul_params · num_tokens            (q, k, v, o projections, SwiGLU)
            + 2 · head_params · head_tokens             (LM head or score head)
            + 4 · L · N · H · context · num_tokens      (q·kᵀ scores and the weighted
                                                         sum of values, per attended key)
    training = 3 · forward (the backward pass costs twice the forward). Recomputation
    by remat is not counted: this is model FLOPs, the numerator of MFU.

    Args:
      config: a LlamaConfig.
      num_tokens: tokens processed (rows × length).
      context: keys each token attends to, on average. Our attention computes full masked
        [T, S] scores, so a full pass over length T attends to T keys (the PaLM MFU
        convention); a decode step attends to the cache slots it reads. 0 counts the
        matmuls only (the 6·params·tokens rule).
      head_tokens: tokens the head is applied to (default num_tokens).
      training: forward + backward (x3) instead of forward only.
    """
    head_tokens = num_tokens if head_tokens is None else head_tokens
    c = config
    forward = (
        2 * matmul_params(c) * num_tokens
        + 2 * head_params(c) * head_tokens
        + 4 * c.num_layers * c.num_heads * c.head_dim * context * num_tokens
    )
    return float(3 * forward if training else forward)


def generation_flops(config, *, prompt_rows, prompt_len, rows, new_tokens) -> float:
    """Prefill of `prompt_rows` prompts (head on the last position only), then `rows`
    rows decoding `new_tokens` tokens each, attending to the prompt plus on average
    half of what was generated (every row runs to `new_tokens`: an upper bound)."""
    prefill = llama_flops(
        config,
        prompt_rows * prompt_len,
        context=prompt_len,
        head_tokens=prompt_rows,
        training=False,
    )
    decode_tokens = rows * new_tokens
    context = prompt_len + new_tokens / 2
    return prefill + llama_flops(config, decode_tokens, context=context, training=False)


def self_play_flops(
    policy,
    *,
    num_queries,
    answers_per_query,
    challenger_prompt_tokens,
    query_tokens,
    answer_tokens,
    solver_template_tokens=0,
    reference=None,
    reward_model=None,
    rm_template_tokens=0,
    judge=True,
    judge_template_tokens=0,
    judge_new_tokens=0,
    train_challenger=True,
) -> dict[str, float]:
    """Analytic FLOPs of one self-play iteration (lsp_step), by phase, and their 'total'.

    With N = num_queries, G = answers_per_query, Pc / Q / A the challenger prompt /
    query / answer lengths, Ps = solver_template_tokens + Q the Solver's prompt:
      challenger_generation  prefill 1 × Pc (broadcast to N rows), decode N × Q
      solver_generation      prefill N × Ps (broadcast to G rows), decode N·G × A
      judge                  reference forward N·G × (judge template + Q + A), score read
                             at the last position; in sampled mode (judge_new_tokens >
                             0) that forward is a prefill followed by N·G × judge_new_tokens
                             decode steps
      reward_model           reward-model forward N·G × (rm template + Q + A)
      reference_logprobs     reference forward on the Solver rows N·G × (Ps + A) and
                             (train_challenger) the Challenger rows N × (Pc + Q)
      policy_train           forward + backward (3x) on the same rows with the policy
    Generation counts every row to its maximum length (an upper bound: rows stop at
    their stop token). Norms, softmax, sampling and the optimizer are left out (<1%).
    """
    reference = policy if reference is None else reference
    n, g = num_queries, answers_per_query
    solver_prompt = solver_template_tokens + query_tokens
    pair = query_tokens + answer_tokens
    parts = {
        "challenger_generation": 0.0
        if not train_challenger
        else generation_flops(
            policy,
            prompt_rows=1,
            prompt_len=challenger_prompt_tokens,
            rows=n,
            new_tokens=query_tokens,
        ),
        "solver_generation": generation_flops(
            policy, prompt_rows=n, prompt_len=solver_prompt, rows=n * g, new_tokens=answer_tokens
        ),
        "judge": 0.0,
        "reward_model": 0.0,
    }
    if judge:
        judged = judge_template_tokens + pair
        parts["judge"] = (
            generation_flops(
                reference,
                prompt_rows=n * g,
                prompt_len=judged,
                rows=n * g,
                new_tokens=judge_new_tokens,
            )
            if judge_new_tokens
            else llama_flops(
                reference, n * g * judged, context=judged, head_tokens=n * g, training=False
            )
        )
    if reward_model is not None:
        scored = rm_template_tokens + pair
        parts["reward_model"] = llama_flops(
            reward_model, n * g * scored, context=scored, training=False
        )
    rows = [(n * g, solver_prompt, answer_tokens)]
    if train_challenger:
        rows.append((n, challenger_prompt_tokens, query_tokens))

    def scored_rows(config, training):
        return sum(
            llama_flops(config, b * (p + a), context=p + a, head_tokens=b * a, training=training)
            for b, p, a in rows
        )

    parts["reference_logprobs"] = scored_rows(reference, False)
    parts["policy_train"] = scored_rows(policy, True)
    parts["total"] = sum(parts.values())
    return parts


def _piece_len(piece) -> int:
    """Length of a template piece: (ids [1, n], lengths [1]) or a flat id array."""
    ids = piece[0] if isinstance(piece, tuple) else piece
    return int(np.shape(ids)[-1])


def step_flops(step_cfg, templates) -> dict[str, float]:
    """`self_play_flops` for a lsp_jax.train.state.StepConfig and its GameTemplates."""
    t = templates
    sampled_judge = step_cfg.judge_mode == "sampled" and step_cfg.judge is not None
    return self_play_flops(
        step_cfg.policy,
        num_queries=step_cfg.num_queries,
        answers_per_query=step_cfg.answers_per_query,
        challenger_prompt_tokens=_piece_len(t.challenger_prompt),
        query_tokens=step_cfg.challenger.max_new_tokens,
        answer_tokens=step_cfg.solver.max_new_tokens,
        solver_template_tokens=_piece_len(t.user_prefix) + _piece_len(t.user_suffix),
        reference=step_cfg.reference,
        reward_model=step_cfg.reward_model if step_cfg.reward_kind == "model" else None,
        rm_template_tokens=sum(_piece_len(p) for p in (t.rm_prefix, t.rm_middle, t.rm_suffix)),
        judge=step_cfg.uses_judge,
        judge_template_tokens=sum(
            _piece_len(p) for p in (t.judge_prefix, t.judge_middle, t.judge_suffix)
        ),
        judge_new_tokens=step_cfg.judge.max_new_tokens if sampled_judge else 0,
        train_challenger=step_cfg.mode != "grpo",
    )
