"""The embedded default: LSP on SmolLM2-135M-Instruct, on a laptop CPU, in minutes.

No external reward model can be had offline, so the quality self-reward of the frozen
reference model (the `expected` judge: one forward pass, Σ s·p(s) over the digits
0..7) is the only reward: reward.kind=none makes R(q, a) = 0, and LSP's rewards
reduce to r_ij = R_Q(q_i, a_ij) for the Solver and c_i = V_Q(q_i) for the
Challenger. For an adversarial Challenger without a reward model, try
  --config.reward.kind=self_judge --config.game.mode=lsp_zero
(R is then the judge's score and c_i = -V(q_i)).

Small N, G and lengths so a few iterations finish in well under 10 minutes on 2 cores.
"""

from lsp_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.source = "smollm2-135m-instruct"
    c.model.scan_layers = True  # One compiled layer instead of 30: much faster to compile.
    # Recompute each layer in the backward pass instead of keeping its activations (30
    # layers of MLP activations, attention probabilities and keys: ~3.8 GiB of the
    # 4.8 GiB of temporaries this run had), so the run fits in a laptop's RAM.
    c.model.remat = True
    c.reward.kind = "none"
    c.reward.judge_mode = "expected"
    c.game.mode = "lsp"
    c.game.num_queries = 4
    c.game.answers_per_query = 2
    c.game.max_query_tokens = 40
    c.game.max_answer_tokens = 64
    c.sampling.temperature = 1.0
    c.loss.beta = 0.05
    c.optim.lr = 3e-6
    c.optim.grad_accum = 1
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 2
    # Print where the time goes once, at the last iteration (lsp_jax.train.phases).
    c.train.phase_times_every = 4
    return c
