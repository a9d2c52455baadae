"""`lsp-jax eval`: win rate of a model against a baseline, judged by a local model."""

import argparse

EPILOG = """\
Both models answer every prompt (temperature 0.01 as in the paper; 0 = greedy), then the
judge compares each pair:
  --judge-kind pairwise      an instruct model reads both answers and says A or B; every pair
                             is judged in both orders and the two probabilities averaged.
  --judge-kind reward_model  a sequence classifier scores each answer; the higher wins.
Outputs in --out: winrate.json, winrate.md, winrate.png, answers.jsonl (and with --ifeval,
ifeval_model/, ifeval_baseline/, ifeval_answers.jsonl).

Example (SmolLM2 against a copy of itself cut to 8 tokens, judged by SmolLM2):
  lsp-jax eval --model smollm2-135m-instruct --baseline smollm2-135m-instruct \\
      --baseline-max-new-tokens 8 --judge smollm2-135m-instruct --limit 50 --out eval_smol
"""


def add_arguments(parser):
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, help="Model source (HF folder, .gguf, name).")
    parser.add_argument("--baseline", required=True, help="Baseline model source.")
    parser.add_argument("--judge", required=True, help="Judge model source.")
    parser.add_argument(
        "--prompts",
        default="shipped",
        help="'shipped', a .jsonl (prompt, category), an AlpacaEval .json or 'tfds:NAME'.",
    )
    parser.add_argument("--judge-kind", choices=("pairwise", "reward_model"), default="pairwise")
    parser.add_argument("--out", default="eval_results", help="Output folder.")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--baseline-max-new-tokens",
        type=int,
        default=None,
        help="Answer budget of the baseline (default: --max-new-tokens).",
    )
    parser.add_argument("--temperature", type=float, default=0.01, help="0 means greedy.")
    parser.add_argument("--limit", type=int, default=None, help="Use the first K prompts.")
    parser.add_argument("--tie-value", type=float, default=0.5, help="Score of a tie.")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generation batch.")
    parser.add_argument("--judge-batch-size", type=int, default=None, help="Rows per judge batch.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000, help="Bootstrap replicates.")
    parser.add_argument(
        "--ifeval",
        nargs="?",
        const="shipped",
        default=None,
        metavar="FILE|shipped",
        help="Also report IFEval-format accuracy of both models (default set: shipped).",
    )
    parser.add_argument("--ifeval-limit", type=int, default=None)
    parser.add_argument(
        "--labels", default="A,B", help="The pairwise judge's two labels, e.g. A,B or 1,2."
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def run(args) -> int:
    import jax.numpy as jnp

    from lsp_jax.errors import UserError
    from lsp_jax.eval import evaluate, judges, winrate

    labels = tuple(label.strip() for label in args.labels.split(","))
    if len(labels) != 2:
        raise UserError(f"--labels {args.labels!r}: give exactly two labels, e.g. A,B.")
    summary = evaluate.evaluate(
        args.model,
        args.baseline,
        args.judge,
        args.prompts,
        judge_kind=args.judge_kind,
        out_dir=args.out,
        max_new_tokens=args.max_new_tokens,
        baseline_max_new_tokens=args.baseline_max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        judge_batch_size=args.judge_batch_size,
        seed=args.seed,
        limit=args.limit,
        tie_value=args.tie_value,
        n_boot=args.n_boot,
        ifeval=args.ifeval,
        ifeval_limit=args.ifeval_limit,
        pairwise_prompt=judges.PairwisePrompt(labels=labels),
        dtype=getattr(jnp, args.dtype),
        progress=not args.no_progress,
    )
    names = summary["setup"]["names"]
    print(
        winrate.format_markdown(summary, model_name=names["model"], baseline_name=names["baseline"])
    )
    if "ifeval" in summary:
        print(evaluate.format_ifeval_comparison(summary["ifeval"], names))
    return 0
