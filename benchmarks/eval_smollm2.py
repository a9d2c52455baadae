"""SmolLM2-135M-Instruct against a degraded copy of itself (answers cut to 8 new tokens),
judged pairwise by SmolLM2 itself, plus both models' IFEval-format accuracy.

    python benchmarks/eval_smollm2.py [--limit 50] [--max-new-tokens 256] [--out DIR]

The shipped prompt set interleaves its five categories, so `--limit 50` keeps 10 prompts of
each. Writes the evaluation outputs (winrate.*, answers.jsonl, ifeval_*) and NOTE.md (the
tables, intervals, judge statistics and wall times) into --out, and prints NOTE.md.
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODEL = "smollm2-135m-instruct"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="Prompts (None: all 260).")
    parser.add_argument("--all", action="store_true", help="All 260 shipped prompts.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--baseline-tokens", type=int, default=8)
    parser.add_argument("--ifeval-limit", type=int, default=None, help="Default: all 120.")
    parser.add_argument("--no-ifeval", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="/tmp/eval_smollm2")
    parser.add_argument(
        "--compile-cache",
        default=os.path.join(os.path.expanduser("~"), ".cache", "lsp_jax_xla"),
        help="Persistent XLA compile cache ('' to disable).",
    )
    return parser.parse_args(argv)


def note(summary, args, total_s) -> str:
    import jax

    from lsp_jax.eval import evaluate, winrate

    names, setup = summary["setup"]["names"], summary["setup"]
    sampling = setup["sampling"]
    table = winrate.format_markdown(
        summary, model_name=names["model"], baseline_name=names["baseline"]
    )
    lines = [
        f"# {names['model']} against {names['baseline']}, judged pairwise by {MODEL}",
        "",
        f"Prompts: shipped set, the first {setup['n_prompts']} (categories interleaved). "
        f"Sampling: temperature {sampling['temperature']}, max new tokens "
        f"{sampling['max_new_tokens']}, seed {sampling['seed']}. Lengths in characters.",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}, float32.",
        "",
        table,
        "Preferences rounded to their side of 0.5 (1 model better, 0 baseline better, 0.5 "
        "tie), win rate and 95% bootstrap interval:",
        "",
        "| category | n | win rate (rounded preferences) |",
        "|---|---:|---:|",
        *[
            f"| {name} | {m['n']} | {m['win_rate']:.1f} "
            f"[{m['win_rate_ci'][0]:.1f}, {m['win_rate_ci'][1]:.1f}] |"
            for name, m in summary["majority"].items()
        ],
        "",
        f"Judge statistics: {summary['judge_stats']}",
        "",
        f"Answers: {summary['generation']}",
        "",
    ]
    if "ifeval" in summary:
        lines += ["IFEval-format accuracy (shipped set, percent):", ""]
        lines += [evaluate.format_ifeval_comparison(summary["ifeval"], names)]
    times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["wall_times_s"].items())
    lines += [f"Wall times: {times}; total {total_s:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from lsp_jax.eval import evaluate, judges

    start = time.perf_counter()
    summary = evaluate.evaluate(
        MODEL,
        MODEL,
        MODEL,
        "shipped",
        judge_kind=judges.PAIRWISE,
        out_dir=args.out,
        max_new_tokens=args.max_new_tokens,
        baseline_max_new_tokens=args.baseline_tokens,
        batch_size=args.batch_size,
        limit=None if args.all else args.limit,
        ifeval=None if args.no_ifeval else "shipped",
        ifeval_limit=args.ifeval_limit,
        names={"model": MODEL, "baseline": f"{MODEL} cut to {args.baseline_tokens} tokens"},
    )
    text = note(summary, args, time.perf_counter() - start)
    with open(os.path.join(args.out, "NOTE.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
