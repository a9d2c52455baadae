"""How much of the expected-mode judge's next-token mass falls on the score digits.

The `expected` judge reads p(0..7) right after the `<Score>` tag and renormalizes over
those eight tokens; mass elsewhere ("s", a space, "</") is ignored, so a low digit mass
means the score rests on a small part of the model's belief. This prints the digit mass,
the expected score and the top next tokens for a few query/answer pairs (good and poor
answers), with the shipped judge prompt or one read from a file:

    .venv/bin/python benchmarks/judge_digit_mass.py [--model smollm2-135m-instruct]
        [--judge-prompt FILE]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from lsp_jax.game import prompts
from lsp_jax.game.rewards import judge_digit_mass
from lsp_jax.game.templates import TemplateTexts, build_templates
from lsp_jax.model import Llama, vocab_logits
from lsp_jax.weights import sources

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I like turtles."),
    (
        "Write a haiku about autumn.",
        "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year breathes slowly.",
    ),
    ("Write a haiku about autumn.", "Autumn is a season. It comes after summer."),
    (
        "Explain what a prime number is.",
        "A prime number is a whole number greater than 1 "
        "whose only divisors are 1 and itself, such as 2, 3, 5, 7 and 11.",
    ),
    ("Explain what a prime number is.", "Prime numbers are numbers."),
    (
        "Give me three tips for sleeping better.",
        "1. Keep a regular schedule. 2. Avoid "
        "screens an hour before bed. 3. Keep your bedroom cool and dark.",
    ),
    ("asdf qwer zxcv", "I am not sure what you mean; could you rephrase your request?"),
]


def judge_rows(chat, judge_prompt):
    t = build_templates(chat, TemplateTexts(challenger_prompt="x", judge_prompt=judge_prompt))
    flat = lambda piece: [int(i) for i in np.asarray(piece[0])[0, : int(piece[1][0])]]
    encode = chat.tokenizer.encode
    rows = [
        flat(t.judge_prefix) + encode(q) + flat(t.judge_middle) + encode(a) + flat(t.judge_suffix)
        for q, a in PAIRS
    ]
    return rows, np.asarray(t.digit_ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=sources.DEFAULT_MODEL)
    parser.add_argument("--judge-prompt", help="File holding a judge prompt to try.")
    args = parser.parse_args()
    judge_prompt = prompts.JUDGE_PROMPT
    if args.judge_prompt:
        with open(args.judge_prompt, encoding="utf-8") as f:
            judge_prompt = f.read()
    config, params = sources.load_model(args.model, scan_layers=True)
    chat = sources.load_chat_template(args.model)
    rows, digit_ids = judge_rows(chat, judge_prompt)
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :], mask[i, width - len(row) :] = row, True

    @jax.jit
    def last_logits(params, tokens, mask):
        hidden = Llama(config).apply({"params": params}, tokens, mask_BT=mask, return_hidden=True)
        return vocab_logits(config, params, hidden[:, -1])

    logits = last_logits(params, tokens, mask)
    mass = np.asarray(judge_digit_mass(logits, jnp.asarray(digit_ids)))
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
    digit_probs = probs[:, digit_ids] / probs[:, digit_ids].sum(-1, keepdims=True)
    expected = digit_probs @ np.arange(len(digit_ids))
    for i, (q, a) in enumerate(PAIRS):
        top = np.argsort(-probs[i])[:4]
        shown = ", ".join(f"{chat.tokenizer.decode([int(t)])!r} {probs[i, t]:.2f}" for t in top)
        print(
            f"{mass[i]:.3f} digit mass, score {expected[i]:.2f} | {q[:30]!r} {a[:30]!r} | {shown}"
        )
    print(f"mean digit mass {mass.mean():.3f} over {len(PAIRS)} pairs")


if __name__ == "__main__":
    main()
