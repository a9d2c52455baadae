"""The reward check in words: the AUC table, the judges' figures, the verdicts, and the
warning `train` logs before its first iteration (lsp_jax.train.reward_check measures)."""

import jax
import numpy as np

from lsp_jax.train.reward_check import (
    CONFIDENCE,
    CUT_TOKENS,
    DEGRADATIONS,
    SIGNAL_AUC,
    Report,
    check,
)


def _format_auc(result, kind, seed):
    low, high = result.interval(kind, seed=seed)
    return f"{result.auc(kind):.2f} [{low:.2f}, {high:.2f}]"


def format_report(report: Report, *, seed: int = 0) -> str:
    """The AUC table of every reward, the judges' digit mass and parse rate, verdicts."""
    cut = DEGRADATIONS["cut"].format(cut=CUT_TOKENS)
    lines = [
        f"Reward check on {report.num_prompts} prompts ({report.prompt_source}); the policy's "
        f"own answers ({report.sampling}) against degraded ones.",
        "AUC = P(the policy's answer outscores the degraded one), ties half; 0.5 is chance; "
        f"[{CONFIDENCE:.0%} bootstrap interval over prompts].",
        "Degradations: other_prompt = "
        + DEGRADATIONS["other_prompt"]
        + f"; cut = {cut}; shuffled = "
        + DEGRADATIONS["shuffled"]
        + "; empty = "
        + DEGRADATIONS["empty"]
        + ".",
        "",
    ]
    kinds = list(DEGRADATIONS)
    header = "| reward | " + " | ".join(kinds) + " | mean score (policy) | verdict |"
    lines += [header, "|" + "---|" * (len(kinds) + 3)]
    for _, _, results in report.judges:
        for r in results:
            cells = [_format_auc(r, kind, seed) for kind in kinds]
            mean = float(np.mean(r.scores["policy"]))
            lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {mean:.3f} | {r.verdict} |")
    judged = [(name, m) for name, m, _ in report.judges if name is not None]
    if judged:
        lines.append("")
        for name, metrics in judged:
            mass, parse = metrics.get("digit_mass"), metrics.get("parse_rate")
            lines.append(
                f"judge {name}: score-token mass {_share(mass)} (probability on the score "
                f"tokens where the score is read), parse rate {_share(parse)}"
            )
    lines.append("")
    for _, _, results in report.judges:
        for r in results:
            lines.append(f"verdict {r.name}: {_verdict_text(r)}")
    return "\n".join(lines)


def _share(value):
    return "n/a" if value is None else f"{value:.3f}"


def _verdict_text(result) -> str:
    if result.verdict == "signal":
        return f"signal: every degradation scores lower (AUC >= {SIGNAL_AUC})."
    separated = [k for k in DEGRADATIONS if result.auc(k) >= SIGNAL_AUC]
    inverted = [k for k in DEGRADATIONS if result.auc(k) <= 1 - SIGNAL_AUC]
    worse = (
        f" It prefers the degraded answer for: {', '.join(inverted)} (AUC <= {1 - SIGNAL_AUC:.2f})."
        if inverted
        else ""
    )
    if result.verdict == "partial":
        return (
            f"partial: separates {', '.join(separated)} (AUC >= {SIGNAL_AUC}) but not the "
            f"other degradations.{worse}"
        )
    return (
        f"AT CHANCE: no degradation reaches AUC {SIGNAL_AUC}; training on this reward "
        f"optimises noise.{worse}"
    )


def before_train(config, run, log) -> None:
    """`reward.check_before_train`: the check on the run's own models before its first
    iteration; warns about every reward at chance (training goes on)."""
    if jax.process_count() > 1:
        log("reward.check_before_train: skipped, the reward check runs on single-host runs.")
        return
    report = check(config, run, log=log)
    log(format_report(report, seed=config.train.seed))
    for name in report.at_chance:
        log(
            f"WARNING: the reward {name} is at chance on the policy's own answers: this run "
            "will optimise noise. See `lsp-jax reward-check --help` for the check, and try "
            "another reward or judge (--judges) before spending accelerator hours."
        )
