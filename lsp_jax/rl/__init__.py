"""Pure loss math in float32: token log-probs, KL estimators, the REINFORCE policy loss."""

from lsp_jax.rl.logprobs import chunked_token_logprobs, token_entropy, token_logprobs
from lsp_jax.rl.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LOSS_KL_ESTIMATORS,
    check_loss_options,
    kl_in_reward,
    kl_penalty,
    lsp_loss,
    policy_loss,
    sequence_logratio,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LOSS_KL_ESTIMATORS",
    "check_loss_options",
    "chunked_token_logprobs",
    "kl_in_reward",
    "kl_penalty",
    "lsp_loss",
    "policy_loss",
    "sequence_logratio",
    "token_entropy",
    "token_logprobs",
]
