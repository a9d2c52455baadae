"""The reference judge: its prompt on SmolLM2 (digit mass), reading sampled scores as real
tokenizers spell them, its own temperature, the parse-failure warning."""

import jax
import jax.numpy as jnp
import numpy as np
import smollm2
from tokenizers import Regex, decoders, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend
from tokenizers import models as token_models

from lsp_jax.game import prompts, rewards
from lsp_jax.game.templates import TemplateTexts, build_templates, score_tag_variants
from lsp_jax.model import Llama, LlamaConfig, vocab_logits
from lsp_jax.train import config as config_lib
from lsp_jax.train import loop
from lsp_jax.train import run as run_lib
from lsp_jax.weights.tokenizer import LLAMA3_SPLIT_PATTERN, HFTokenizer, SpecialIds

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I like turtles."),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall,\ngolden light on quiet paths."),
    ("Explain what a prime number is.", "A whole number above 1 divisible only by 1 and itself."),
    ("asdf qwer zxcv", "I am not sure what you mean; could you rephrase your request?"),
]


def test_smollm2_puts_its_mass_on_the_score_digits():
    """The `expected` judge renormalizes over the digits; the shipped prompt must make them
    the model's belief: with `<Score>s</Score>` in the prompt SmolLM2 put ~41 % there."""
    model = smollm2.load()
    t = build_templates(model.chat, TemplateTexts("x", prompts.JUDGE_PROMPT))
    flat = lambda piece: list(np.asarray(piece[0])[0, : int(piece[1][0])])
    encode = model.tokenizer.encode
    rows = [
        flat(t.judge_prefix) + encode(q) + flat(t.judge_middle) + encode(a) + flat(t.judge_suffix)
        for q, a in PAIRS
    ]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :], mask[i, width - len(row) :] = row, True

    @jax.jit
    def digit_mass(params, tokens, mask):
        hidden = Llama(model.config).apply(
            {"params": params}, tokens, mask_BT=mask, return_hidden=True
        )
        logits = vocab_logits(model.config, params, hidden[:, -1])
        return rewards.judge_digit_mass(logits, jnp.asarray(t.digit_ids))

    mass = np.asarray(digit_mass(model.params, tokens, mask))
    assert mass.min() > 0.75 and mass.mean() > 0.8, mass


def _parse(tokenizer, texts):
    patterns = score_tag_variants(tokenizer)
    rows = [tokenizer.encode(text) for text in texts]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
    scores, parsed = rewards.parse_sampled_score(
        jnp.asarray(tokens), jnp.asarray(mask), patterns, fallback=-1.0
    )
    return np.asarray(scores).tolist(), np.asarray(parsed).tolist()


SPELLINGS = [
    "The answer is fine.\n<Calculation>1+1+1+1+1+0+0=5</Calculation>\n<Score>5</Score>",
    "Good. <Score> 6</Score>",
    "Good.\n<Score>\n3\n</Score>",
    "Sum: 4+0=4 <Score>  2 </Score>",
    "No score here: 7.",
]


def test_sampled_scores_read_with_whitespace_after_the_tag_smollm2():
    assert _parse(smollm2.tokenizer(), SPELLINGS) == ([5, 6, 3, 2, -1], [True] * 4 + [False])


def test_sampled_scores_read_where_the_tag_absorbs_the_newline():
    """Llama-3's pre-tokenizer keeps ">" and a following newline together, and its BPE has
    one token for ">\\n": the digit then follows the tag's last token directly."""
    backend = Backend(token_models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [f"Judged. <Score>\n{d}\n</Score> <Score>{d}</Score>" for d in range(8)] * 20
    backend.train_from_iterator(corpus, trainer)
    tokenizer = HFTokenizer(backend, SpecialIds(None, (0,), 0))
    ids = tokenizer.encode("<Score>\n5")
    assert [tokenizer.decode([i]) for i in ids][-2:] == [">\n", "5"]  # The case at hand.
    assert _parse(tokenizer, SPELLINGS) == ([5, 6, 3, 2, -1], [True] * 4 + [False])


def _tiny(**overrides):
    import os

    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    config = config_lib.load_config(tiny)
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config


def test_judge_samples_at_its_own_temperature():
    from lsp_jax.weights import sources

    tokenizer = sources.load_tokenizer("tiny-random")

    def step_config(**overrides):
        config = _tiny(**{"reward.judge_mode": "sampled", **overrides})
        return run_lib.make_step_config(
            config, LlamaConfig.tiny(), LlamaConfig.tiny(), None, tokenizer
        )

    cfg = step_config()  # Default: greedy, whatever the policy's temperature.
    assert cfg.judge.greedy and cfg.solver.temperature == 1.0 and not cfg.solver.greedy
    cfg = step_config(**{"reward.judge_temperature": 0.3, "sampling.temperature": 0.9})
    assert (cfg.judge.temperature, cfg.judge.greedy, cfg.solver.temperature) == (0.3, False, 0.9)


def test_parse_failures_over_the_threshold_warn_at_most_every_100_iterations():
    warning = loop._ParseFailureWarning(_tiny().reward)
    lines = []
    for step in range(1, 251):
        rate = 0.1 if step < 5 else 0.6  # Fine, then mostly unreadable.
        warning.check(step, {"judge/parse_failure_rate": np.float32(rate)}, lines.append)
    assert len(lines) == 3 and "at iteration 5, 60%" in lines[0], lines
    assert "judge_fallback=0.0" in lines[0] and "at iteration 105" in lines[1]
