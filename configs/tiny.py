"""A random tiny model for tests: LSP with a reward model and the expected self-judge.

`tiny-random` (policy) and `tiny-random-rm` (a LlamaForSequenceClassification) are
seeded random LlamaConfig.tiny() models with a byte-level tokenizer, written once as
Hugging Face folders (lsp_jax/weights/tiny.py): no files to fetch, no network.
"""

from lsp_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.source = "tiny-random"
    c.reward.kind = "model"
    c.reward.model = "tiny-random-rm"
    c.game.mode = "lsp"
    c.game.num_queries = 2
    c.game.answers_per_query = 2
    c.game.max_query_tokens = 6
    c.game.max_answer_tokens = 6
    c.game.challenger_prompt = "Write one question about {task}."
    c.game.task = "numbers"
    c.game.judge_prompt = "Q: {instruction}\nA: {response}\nScore:"
    # Six-token texts are nearly always truncated: score them, or no group would differ.
    c.game.truncated_reward = "score"
    c.sampling.decode_buckets = 1  # Fewer loop bodies: faster to compile.
    c.optim.lr = 1e-3
    c.train.num_steps = 3
    c.train.checkpoint_every = 1
    c.train.samples_to_log = 1
    return c
