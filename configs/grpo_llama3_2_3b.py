"""GRPO baseline on Llama-3.2-3B-Instruct: prompts from a prompt set instead of the Challenger.

Same settings as configs/lsp_llama3_2_3b.py (read its docstring), with game.mode=grpo
and lr 1e-6. The paper ran it on Alpaca prompts with TRL: set
--config.data.prompts=PATH to an AlpacaEval-format JSON or a JSONL prompt file.

Where LSP's loss and TRL's GRPOTrainer differ, this config follows TRL's defaults, since
TRL is what the paper's baseline ran:
- advantages divided by the standard deviation of the query's group (TRL's
  scale_rewards; the sample std, + eps): game.normalize_std=True;
- the loss averaged over all completion tokens of the batch (TRL's token-level
  loss_type, "bnpo"/"dapo", not LSP's sum over each sequence's tokens):
  loss.aggregation=token_mean;
- the k3 KL estimator per token, as TRL, with the paper's β = 0.05 (TRL's own default β
  has changed between releases; the paper gives 0.05).
TRL's PPO-style ratio clipping is inactive here as in TRL with one update per rollout
(num_iterations=1): the ratio is 1. Kept from LSP, not TRL: G answers per query
(game.answers_per_query=4, the paper's "batch"; TRL's num_generations default is 8) and
no entropy bonus (TRL has none either).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "lsp_llama3_2_3b", os.path.join(os.path.dirname(__file__), "lsp_llama3_2_3b.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    return _base.get_config("grpo")
