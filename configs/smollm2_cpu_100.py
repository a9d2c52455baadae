"""The documented CPU run (docs/results.md): 100 LSP iterations on SmolLM2-135M-Instruct,
sized for at most 90 minutes on 2 idle CPU cores.

configs/smollm2_cpu.py with more iterations and a budget per iteration: G = 4 answers per
query (a group baseline from 2 answers is noisy), shorter queries and answers to pay for
them, and a higher learning rate than the paper's 3e-6 (100 iterations of a 135M model at
3e-6 barely move it). Checkpoints every 10 iterations, so an interrupted run resumes
with little lost; a win-rate probe against the reference every 25.
"""

import importlib.util
import os


def _base():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_cpu.py")
    spec = importlib.util.spec_from_file_location("lsp_jax_smollm2_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg=None):
    c = _base()
    c.model.lora.rank = 0  # Full fine-tuning, as the documented run was made (5-6 GB of RAM).
    c.game.num_queries = 4
    c.game.answers_per_query = 4
    c.game.max_query_tokens = 32
    c.game.max_answer_tokens = 48
    c.optim.lr = 1e-5
    c.train.num_steps = 100
    c.train.checkpoint_every = 10
    c.train.phase_times_every = 50
    c.eval.every = 25
    c.eval.num_prompts = 16
    c.eval.max_new_tokens = 64
    return c
