"""A reward model and a judge built by hand, so that the best answer is known in advance.

Both are LlamaConfig.tiny()-shaped models (of any width D) whose output depends only on

    m = v · mean over the sequence's real tokens of f(w_t),   f(w) = w / sqrt((1 + w²)/D + ε),

for a per-token weight w_t (e.g. +1 for a set of rewarded tokens, -1 for penalised ones,
0 elsewhere). Construction: token t embeds as e0 + w_t·e1; layer 0's attention has zero
query and key weights, so every position attends uniformly to all visible tokens, its
value reads the normalised e1 component (= f(w_t)) and its output writes the mean to e2;
every other attention and MLP output is zero. The last position's residual is then
e0 + w_last·e1 + m·e2, and after the final RMSNorm its e2 component is
m / sqrt((1 + w_last² + m²)/D + ε), strictly increasing in m (ε is the RMSNorm epsilon;
the last token is a fixed template token). The reward model's score head reads
e2/sqrt(D):

    R = m / sqrt(1 + w_last² + m² + D·ε)   ∈ (-1, 1)

and the judge's LM head gives the score token of value s the logit s·gain·R, all other
tokens logit 0, so its expected score Σ s·p(s) rises with m. More rewarded tokens and
fewer penalised ones anywhere in the pair (query or answer) raise both. The value weight v
(1 by default) keeps m in the same range at another width D: f grows as sqrt(D), so
v = sqrt(64 / D) scores as the 64-wide model does.
"""

import numpy as np

from lsp_jax.model import LlamaConfig


def _token_rate_params(config: LlamaConfig, weights_V, value=1.0):
    D = config.dim
    weights_V = np.asarray(weights_V, np.float32)
    embedding_VD = np.zeros((config.vocab_size, D), np.float32)
    embedding_VD[:, 0] = 1.0
    embedding_VD[:, 1] = weights_V
    layer = lambda: {
        "attn": {
            "q": np.zeros((D, config.num_heads, config.head_dim), np.float32),
            "k": np.zeros((D, config.num_kv_heads, config.head_dim), np.float32),
            "v": np.zeros((D, config.num_kv_heads, config.head_dim), np.float32),
            "o": np.zeros((config.num_heads, config.head_dim, D), np.float32),
        },
        "attn_norm": {"scale": np.ones(D, np.float32)},
        "mlp": {
            "gate": np.zeros((D, config.mlp_dim), np.float32),
            "up": np.zeros((D, config.mlp_dim), np.float32),
            "down": np.zeros((config.mlp_dim, D), np.float32),
        },
        "mlp_norm": {"scale": np.ones(D, np.float32)},
    }
    params = {f"layers_{i}": layer() for i in range(config.num_layers)}
    params["layers_0"]["attn"]["v"][1, 0, 0] = value  # kv head 0 reads v·e1 ...
    params["layers_0"]["attn"]["o"][0, 0, 2] = 1.0  # ... query head 0 writes it to e2.
    params["embed"] = {"embedding": embedding_VD}
    params["final_norm"] = {"scale": np.ones(D, np.float32)}
    return params


def token_rate_reward_model(config: LlamaConfig, weights_V):
    """Params of a sequence classifier scoring R = m / sqrt(1 + w_last² + m² + D·ε)."""
    assert config.is_classifier and not config.scan_layers
    params = _token_rate_params(config, weights_V)
    kernel_D1 = np.zeros((config.dim, 1), np.float32)
    kernel_D1[2, 0] = config.dim**-0.5
    params["score"] = {"kernel": kernel_D1}
    return params


JUDGE_GAIN = 4.0


def token_rate_judge(config: LlamaConfig, weights_V, score_ids, *, gain=JUDGE_GAIN, value=1.0):
    """Params of a causal LM whose next-token logit for score_ids[s] is s·gain·R."""
    assert not config.is_classifier and not config.tie_embeddings and not config.scan_layers
    params = _token_rate_params(config, weights_V, value)
    kernel_DV = np.zeros((config.dim, config.vocab_size), np.float32)
    for value, token in enumerate(score_ids):
        kernel_DV[2, token] = value * gain * config.dim**-0.5
    params["lm_head"] = {"kernel": kernel_DV}
    return params


def expected_reward(tokens, weights_V, config: LlamaConfig, *, value=1.0):
    """The reward model's score of one unpadded token sequence, by the formula above."""
    w = np.asarray(weights_V, np.float64)[np.asarray(tokens)]
    m = value * np.mean(w / np.sqrt((1.0 + w**2) / config.dim + config.rms_eps))
    return m / np.sqrt(1.0 + w[-1] ** 2 + m**2 + config.dim * config.rms_eps)


def expected_judge_score(tokens, weights_V, config, *, num_scores, gain=JUDGE_GAIN, value=1.0):
    """The judge's expected score Σ s·p(s) after one unpadded token sequence."""
    reward = expected_reward(tokens, weights_V, config, value=value)
    logits_S = np.arange(num_scores) * gain * reward
    p_S = np.exp(logits_S - logits_S.max())
    return float(np.sum(np.arange(num_scores) * p_S) / p_S.sum())
