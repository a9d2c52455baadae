"""Per-token log-probabilities and entropies from logits or from final hidden states.

B batch, T time, D model width, V vocab. Outputs are float32.
"""

import jax
import jax.numpy as jnp

LAYOUTS = ("VD", "DV")


def _logp_and_entropy(logits_BTV, targets_BT, temperature):
    """Log-prob of each target and the entropy of each position's distribution, float32."""
    # float32: log-softmax over 128k bf16 logits loses the small log-prob differences the
    # policy gradient and KL are made of (bf16 has 8 bits of mantissa).
    logits_BTV = logits_BTV.astype(jnp.float32) / temperature
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    probs_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
    entropy_BT = lse_BT - jnp.sum(probs_BTV * logits_BTV, axis=-1)
    return target_BT - lse_BT, entropy_BT


def token_logprobs(logits_BTV, targets_BT, *, temperature=1.0):
    """log softmax(logits / temperature)[target] at each position.

    Args:
      logits_BTV: [B, T, V] any float dtype (computed in float32).
      targets_BT: [B, T] int token ids; targets_BT[b, t] is the token that logits_BTV[b, t]
        predicts (the caller shifts by one).
      temperature: the sampling temperature the tokens were drawn with.

    Returns:
      logp_BT: [B, T] float32.
    """
    logits_BTV = logits_BTV.astype(jnp.float32) / temperature  # float32: see _logp_and_entropy
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_BT - lse_BT


def token_entropy(logits_BTV, *, temperature=1.0):
    """Entropy (nats) of softmax(logits / temperature) at each position, [B, T] float32."""
    targets_BT = jnp.zeros(logits_BTV.shape[:-1], jnp.int32)
    return _logp_and_entropy(logits_BTV, targets_BT, temperature)[1]


def chunked_token_logprobs(
    hidden_BTD,
    unembed,
    targets_BT,
    *,
    layout="VD",
    chunk=256,
    temperature=1.0,
    return_entropy=False,
):
    """token_logprobs(hidden @ unembed) without materializing the [B, T, V] logits.

    Walks over T in chunks of `chunk` positions with lax.map; each chunk's [B, chunk, V]
    logits are rematerialized in the backward pass (jax.checkpoint), so peak memory holds
    one chunk of logits, not all of them. This matters at V = 128256 (Llama-3).

    Args:
      hidden_BTD: [B, T, D] final hidden states (after the final norm).
      unembed: the output projection, [V, D] for layout 'VD' (a tied embedding table) or
        [D, V] for layout 'DV' (an untied lm_head kernel).
      targets_BT: [B, T] int token ids predicted at each position.
      layout: 'VD' or 'DV'.
      chunk: positions per chunk; T is padded up to a multiple of it.
      temperature: the sampling temperature.
      return_entropy: also return the per-position entropy.

    Returns:
      logp_BT [B, T] float32, or (logp_BT, entropy_BT) with return_entropy.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown unembedding layout {layout!r}; valid: {', '.join(LAYOUTS)}.")
    B, T, D = hidden_BTD.shape
    C = max(1, min(chunk, T))
    num_chunks = -(-T // C)
    pad = num_chunks * C - T
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    hidden_nBCD = hidden_BTD.reshape(B, num_chunks, C, D).transpose(1, 0, 2, 3)
    targets_nBC = targets_BT.reshape(B, num_chunks, C).transpose(1, 0, 2)
    spec = "BCD,VD->BCV" if layout == "VD" else "BCD,DV->BCV"

    def one_chunk(args):
        hidden_BCD, targets_BC = args
        # Accumulate the matmul in float32 without upcasting the (large) unembedding.
        logits_BCV = jnp.einsum(spec, hidden_BCD, unembed, preferred_element_type=jnp.float32)
        return _logp_and_entropy(logits_BCV, targets_BC, temperature)

    one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)
    logp_nBC, entropy_nBC = jax.lax.map(one_chunk, (hidden_nBCD, targets_nBC))
    unchunk = lambda x_nBC: x_nBC.transpose(1, 0, 2).reshape(B, num_chunks * C)[:, :T]
    if return_entropy:
        return unchunk(logp_nBC), unchunk(entropy_nBC)
    return unchunk(logp_nBC)
