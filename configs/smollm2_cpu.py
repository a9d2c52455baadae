"""The embedded default: LSP on SmolLM2-135M-Instruct, on a laptop CPU, in minutes.

No external reward model can be had offline, so the quality self-reward of the frozen
reference model (an `expected` judge: one forward pass, read from the next-token
probabilities) is the only reward: reward.kind=none makes R(q, a) = 0, and LSP's rewards
reduce to r_ij = R_Q(q_i, a_ij) for the Solver and c_i = V_Q(q_i) for the
Challenger.

The judge is `yes_no` (lsp_jax/game/judges.py: "Is the reply a helpful answer to this
user's message?", scored P(Yes) in 0..1), the best `lsp-jax reward-check` found for
SmolLM2-135M: it ranks the policy's answers above cut (AUC 0.68) and empty (0.89) ones,
where the paper's seven-criteria 0..7 judge prefers empty answers (0.28). None of the
judges tells an answer from the answer to another prompt (best AUC 0.58), so this run
demonstrates the machinery, not the method (README, "Checking a reward before
training"). `--config configs/smollm2_cpu.py:paper` (or another judge's name) picks
another judge. For an adversarial Challenger without a reward model, try
  --config.reward.kind=self_judge --config.game.mode=lsp_zero
(R is then the judge's score and c_i = -V(q_i)).

Small N, G and lengths so a few iterations finish in well under 10 minutes on 2 cores.
"""

from lsp_jax.game import judges
from lsp_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.source = "smollm2-135m-instruct"
    c.model.scan_layers = True  # One compiled layer instead of 30: much faster to compile.
    # Recompute each layer in the backward pass instead of keeping its activations (30
    # layers of MLP activations, attention probabilities and keys: ~3.8 GiB of the
    # 4.8 GiB of temporaries this run had), so the run fits in a laptop's RAM.
    c.model.remat = True
    # Rank-16 adapters on every projection, the base frozen: the base is also the
    # reference and the judge (one copy of the model), and AdamW keeps moments of the
    # adapters only (4.4 M parameters). XLA then needs 0.56 GiB of arguments and 0.44 GiB
    # of temporaries where full fine-tuning needs 2.00 and 1.75 (float32 weights, two
    # moments, a reference copy; benchmarks/train_memory.py), so the run fits a laptop's
    # RAM. --config.model.lora.rank=0 fine-tunes the whole model (about 5-6 GB).
    c.model.lora.rank = 16
    c.reward.kind = "none"
    c.reward.judge_mode = "expected"
    judges.apply(c, arg or "yes_no")
    c.game.mode = "lsp"
    c.game.num_queries = 4
    c.game.answers_per_query = 2
    c.game.max_query_tokens = 40
    c.game.max_answer_tokens = 64
    # At these short limits (kept short for speed) most texts are truncated; giving them
    # their group's minimum would leave most groups without a learning signal.
    c.game.truncated_reward = "score"
    c.sampling.temperature = 1.0
    c.loss.beta = 0.05
    c.optim.lr = 1e-4  # Adapters take a larger rate than full fine-tuning (paper: 3e-6).
    c.optim.grad_accum = 1
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
    # Keep only the newest checkpoint (the adapters and their two moments, ~53 MB; with
    # lora.rank=0 the whole model's, 3 × 0.54 GB in float32).
    c.train.keep_checkpoints = 1
    # Print where the time goes once, at the last iteration (lsp_jax.train.phases).
    c.train.phase_times_every = 4
    return c
