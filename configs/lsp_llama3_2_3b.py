"""LSP on Llama-3.2-3B-Instruct with the paper's settings (arXiv 2509.07414 v3, App. C).

Required: --config.model.source=PATH (a local Llama-3.2-3B-Instruct Hugging Face folder)
and --config.reward.model=PATH (Skywork-Reward-V2-Llama-3.2-3B, a
LlamaForSequenceClassification sharing Llama-3's tokenizer).

From the paper: β = 0.05, lr = 3e-6, gradient accumulation 2, "#queries" 8, batch 4,
the quality self-reward on (LSP, not LSP-Zero). How we read the table: "#queries" = N,
the Challenger's queries per iteration (8), and "batch" = G, the Solver's answers per
query (4), so one iteration scores N·G = 32 answers. The paper does not give α_Ch,
the optimizer, the schedule, lengths or temperature: we use α_Ch = 1, AdamW with a
constant rate, 256 query and 512 answer tokens, temperature 1.0, and the k3 KL
estimator per token (the paper's literal k1 term has zero expected gradient; set
--config.loss.kl_estimator=k1 to reproduce it). The paper shows iterations 500-1500.

Pass a different variant as the config argument: configs/lsp_llama3_2_3b.py:lsp_zero or
:grpo (same as the dedicated files).
"""

from lsp_jax.train.config import default_config


def get_config(arg=None):
    mode = arg or "lsp"
    c = default_config()
    c.model.source = ""  # Required: a Llama-3.2-3B-Instruct folder.
    c.model.preset = "llama3_2_3b"  # The architecture, for `lsp-jax aot` without weights.
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.frozen_param_dtype = "bfloat16"  # Reference judge and reward model.
    c.model.scan_layers = True
    c.model.remat = True
    c.reward.kind = "model"
    c.reward.model = ""  # Required: Skywork-Reward-V2-Llama-3.2-3B.
    c.reward.preset = "llama3_2_3b"  # Skywork-Reward-V2-Llama-3.2-3B's architecture.
    c.reward.judge_mode = "expected"
    c.game.mode = mode
    c.game.num_queries = 8
    c.game.answers_per_query = 4
    c.game.max_query_tokens = 256
    c.game.max_answer_tokens = 512
    c.loss.beta = 0.05
    c.loss.kl_estimator = "k3"
    c.loss.aggregation = "sequence_sum"
    c.loss.logprob_chunk = 128  # Never materialize [B, T, 128256] logits.
    # One decode loop per rollout. Compiled for v5e:2x4 (`lsp-jax aot`, idle 2-core
    # machine), 4 buckets took 435 s (804 s of CPU) and gave an estimated 4.39 s per
    # iteration; 1 bucket 314 s (590 s of CPU) and 4.19 s (the bucketed attention's cache
    # slices cost more HBM traffic than the shorter reads save at these lengths), with
    # the same peak HBM.
    c.sampling.decode_buckets = 1
    c.optim.lr = 1e-6 if mode == "grpo" else 3e-6
    if mode == "grpo":
        # The paper's GRPO baseline ran TRL's GRPOTrainer: match its defaults (see
        # configs/grpo_llama3_2_3b.py): group-std-normalized advantages, per-token loss.
        c.game.normalize_std = True
        c.loss.aggregation = "token_mean"
    c.optim.grad_accum = 2
    c.train.num_steps = 1500
    c.train.checkpoint_every = 100
    c.train.export_every = 500
    c.train.log_every = 1
    c.mesh.shape = (1, -1, 1)  # FSDP over every chip.
    return c
