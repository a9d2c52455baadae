"""Forward passes over groups of completions that share a prompt (the prompt run once per
group), and the completions' token log-probs, for the policy and the reference."""

import jax.numpy as jnp

from lsp_jax import rl
from lsp_jax.model import SharedPrefixLlama, unembedding, vocab_logits


def forward_with_prefix(model_cfg, params, prefix_PT, prefix_mask_PT, tokens_BA, mask_BA):
    """Runs P prefixes once, then B = P·k continuations (row b continues prefix b // k)
    attending to them, as the sampler does; gradients flow through both parts.

    Returns:
      (hidden_BAD of the continuation tokens, last_BD: each row's final hidden state,
      prefix_last_BD: the prefix's final hidden state, which predicts token 0).
    """
    group = (prefix_PT, prefix_mask_PT, tokens_BA, mask_BA)
    return forward_groups(model_cfg, params, [group])[0]


def forward_groups(model_cfg, params, groups):
    """`forward_with_prefix` of several groups [(prefix_PT, prefix_mask_PT, tokens_BA,
    mask_BA), ...] in one pass through the layers (SharedPrefixLlama), so that their
    gradient is built once. Returns one forward_with_prefix triple per group."""
    hidden = SharedPrefixLlama(model_cfg).apply({"params": params}, tuple(groups))
    out = []
    for (prefix_PT, *_), (prefix_PTD, hidden_BAD) in zip(groups, hidden):
        group = hidden_BAD.shape[0] // prefix_PT.shape[0]
        prefix_last_BD = jnp.repeat(prefix_PTD[:, -1], group, axis=0)
        out.append((hidden_BAD, hidden_BAD[:, -1], prefix_last_BD))
    return out


def completion_logprobs(model_cfg, params, prompt_PT, prompt_mask_PT, tokens_BA, mask_BA, cfg):
    """log π(completion token | prompt, earlier tokens) at the sampling temperature, [B, A].

    Each of the P prompts is shared by B / P completion rows and computed once. The same
    temperature as the sampler, so these equal the sampler's log-probs when params are
    the sampling params (the metric `logprob/max_sampler_gap` checks it).
    """
    rows = (prompt_PT, prompt_mask_PT, tokens_BA, mask_BA)
    return groups_logprobs(model_cfg, params, [rows], cfg)[0]


def groups_logprobs(model_cfg, params, groups, cfg):
    """`completion_logprobs` of several groups of rows (e.g. the Solver's and the
    Challenger's) from one pass through the layers; a list of [B, A] arrays."""
    out = []
    for (_, _, tokens_BA, _), (hidden_BAD, _, prefix_last_BD) in zip(
        groups, forward_groups(model_cfg, params, groups)
    ):
        # Token 0 is predicted by the prompt's last position, token t by completion t - 1.
        hidden_BAD = jnp.concatenate([prefix_last_BD[:, None], hidden_BAD[:, :-1]], axis=1)
        out.append(_token_logprobs(model_cfg, params, hidden_BAD, tokens_BA, cfg))
    return out


def _token_logprobs(model_cfg, params, hidden_BAD, tokens_BA, cfg):
    if cfg.logprob_chunk:
        matrix, layout = unembedding(model_cfg, params)
        return rl.chunked_token_logprobs(
            hidden_BAD,
            matrix.astype(model_cfg.dtype),
            tokens_BA,
            layout=layout,
            chunk=cfg.logprob_chunk,
            temperature=cfg.solver.temperature,
        )
    logits_BAV = vocab_logits(model_cfg, params, hidden_BAD)
    return rl.token_logprobs(logits_BAV, tokens_BA, temperature=cfg.solver.temperature)
