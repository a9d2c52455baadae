"""Win-rate evaluation: a model and a baseline answer the same prompts, a local model judges.

The answers come from lsp_jax.eval.answers (the jitted sampler, seeded per prompt), the
judgements from lsp_jax.eval.judges (a reward model, or a pairwise instruct model asked in
both orders), the statistics from lsp_jax.eval.winrate. Lengths for the length-controlled
win rate are counted in characters (comparable across tokenizers).
"""

import contextlib
import json
import os
import time
from collections.abc import Callable

import numpy as np

from lsp_jax import data
from lsp_jax.errors import UserError
from lsp_jax.eval import winrate
from lsp_jax.eval.answers import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    Answers,
    EvalModel,
    ModelCache,
    sample_answers,
    source_name,
)
from lsp_jax.eval.judges import (
    JUDGE_KINDS,
    PAIRWISE,
    PairwisePrompt,
    check_judge,
    judge_pairs,
)
from lsp_jax.model import LlamaConfig

LENGTH_UNIT = "characters"


class _Clock:
    """Wall time per phase, printed as each phase ends."""

    def __init__(self, log):
        self.log, self.times = log, {}

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - start, 2)
        self.log(f"[eval] {name}: {self.times[name]:.1f} s")


def _answer_stats(answers: Answers) -> dict:
    lengths = [len(ids) for ids in answers.token_ids]
    return {
        "avg_tokens": float(np.mean(lengths)) if lengths else None,
        "stopped_fraction": float(np.mean(answers.stopped)) if lengths else None,
    }


def _ifeval_phase(models, source, *, limit, out_dir, generate):
    """Answers IFEval prompts with each model and scores them; writes one report per role."""
    from lsp_jax.eval import ifeval

    examples = ifeval.load_ifeval(source, limit=limit)
    results, texts = {}, {}
    for role, (model, max_new_tokens) in models.items():
        answers = generate(model, [e.prompt for e in examples], max_new_tokens, f"ifeval {role}")
        texts[role] = answers.texts
        results[role] = ifeval.score_ifeval(examples, answers.texts)
        if out_dir:
            ifeval.write_ifeval_report(results[role], os.path.join(out_dir, f"ifeval_{role}"))
    if out_dir:
        with open(os.path.join(out_dir, "ifeval_answers.jsonl"), "w", encoding="utf-8") as f:
            for k, example in enumerate(examples):
                record = {"key": example.key, "prompt": example.prompt}
                record |= {f"{role}_output": texts[role][k] for role in models}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    keys = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict")
    keys += ("instruction_level_loose", "n_prompts", "n_instructions", "n_prompts_skipped")
    return {role: {k: result[k] for k in keys} for role, result in results.items()}


def format_ifeval_comparison(ifeval_summary: dict, names: dict) -> str:
    """Markdown table of the four IFEval accuracies of each model."""
    lines = [
        "| model | prompt strict | prompt loose | instruction strict | instruction loose | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    cell = lambda v: "n/a" if v is None else f"{v:.1f}"
    for role, r in ifeval_summary.items():
        lines.append(
            f"| {names[role]} | {cell(r['prompt_level_strict'])} | {cell(r['prompt_level_loose'])}"
            f" | {cell(r['instruction_level_strict'])} | {cell(r['instruction_level_loose'])}"
            f" | {r['n_prompts']} |"
        )
    return "\n".join(lines) + "\n"


def _write_outputs(out_dir, summary, prompts, answers, judgement, names):
    os.makedirs(out_dir, exist_ok=True)
    paths = winrate.write_report(
        summary, out_dir, model_name=names["model"], baseline_name=names["baseline"]
    )
    paths["answers"] = os.path.join(out_dir, "answers.jsonl")
    data.write_answers(
        paths["answers"],
        prompts,
        answers["model"].texts,
        generator=names["model"],
        baseline_outputs=answers["baseline"].texts,
        baseline_generator=names["baseline"],
        preferences=judgement["preference"],
    )
    _add_judge_details(paths["answers"], judgement)
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("\n" + _setup_markdown(summary))
        if "ifeval" in summary:
            f.write("\nIFEval-format accuracy (percent):\n\n")
            f.write(format_ifeval_comparison(summary["ifeval"], names))
    return paths


def _add_judge_details(path, judgement):
    """Adds the judge's raw per-pair numbers (both orders, scores) to answers.jsonl."""
    keys = [k for k in judgement if k != "preference"]
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            record["judge"] = {key: judgement[key][i] for key in keys}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _setup_markdown(summary) -> str:
    setup, lines = summary["setup"], ["Setup:", ""]
    for key in ("model", "baseline", "judge", "judge_kind", "prompts", "n_prompts"):
        lines.append(f"- {key}: {setup[key]}")
    lines.append(f"- sampling: {setup['sampling']}")
    for role, stats in summary["generation"].items():
        lines.append(
            f"- {role} answers: {stats['avg_tokens']:.1f} tokens on average, "
            f"{100 * stats['stopped_fraction']:.0f}% ended by the model"
        )
    if summary.get("judge_stats"):
        lines.append(f"- judge: {summary['judge_stats']}")
    if summary.get("majority"):
        overall = summary["majority"][winrate.OVERALL]
        lines.append(
            "- win rate of the preferences rounded to 0/0.5/1: "
            f"{_format_rate(overall['win_rate'], overall['win_rate_ci'])}"
        )
    times = ", ".join(f"{k} {v:.1f} s" for k, v in summary["wall_times_s"].items())
    lines += [f"- wall times: {times}", ""]
    return "\n".join(lines)


def _format_rate(value, interval) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def _judge_stats(judgement) -> dict:
    stats = {"identical_pairs": int(sum(judgement["identical"]))}
    if "label_mass" in judgement:
        mass = [m for m in judgement["label_mass"] if m is not None]
        stats["mean_label_mass"] = float(np.mean(mass)) if mass else None
        a = [p for p in judgement["p_model_as_a"] if p is not None]
        b = [p for p in judgement["p_model_as_b"] if p is not None]
        # Position bias: how much more the judge favours whichever answer is shown first.
        stats["mean_p_model_as_a"] = float(np.mean(a)) if a else None
        stats["mean_p_model_as_b"] = float(np.mean(b)) if b else None
    return stats


def evaluate(
    model_source,
    baseline_source,
    judge_source,
    prompts=data.SHIPPED,
    *,
    judge_kind: str = PAIRWISE,
    out_dir=None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    baseline_max_new_tokens: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    judge_batch_size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    tie_value: float = winrate.TIE,
    n_boot: int = 1000,
    ifeval=None,
    ifeval_limit: int | None = None,
    pairwise_prompt: PairwisePrompt | None = None,
    dtype=None,
    names: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Win rate of a model against a baseline, judged by a local model.

    Args:
      model_source, baseline_source, judge_source: model sources (HF folder, .gguf, named).
      prompts: a prompt source for data.load_prompts, or a list of data.Prompt.
      judge_kind: 'pairwise' (instruct model, both orders) or 'reward_model' (classifier).
      out_dir: if given, winrate.{json,md,png}, answers.jsonl (and IFEval reports) go here.
      max_new_tokens: answer budget of the model (and of the baseline unless
        baseline_max_new_tokens is given, e.g. 8 for a truncated baseline).
      temperature: sampling temperature (0: greedy).
      batch_size, judge_batch_size: rows per generation / judge forward pass.
      seed: sampling seed (the same for both models).
      limit: use only the first `limit` prompts.
      tie_value: score of a tie in the win rate.
      n_boot: bootstrap replicates of the intervals.
      ifeval: None, 'shipped' or an IFEval JSONL path: also score both models on it
        (ifeval_limit: its first prompts only).
      pairwise_prompt: wording and labels of the pairwise judge.
      dtype: compute dtype of all three models (default float32).
      names: display names {'model': ..., 'baseline': ...} (default from the sources).
      progress: show tqdm bars; log: where phase wall times are printed.

    Returns:
      The summary of `winrate.summarize` plus 'setup', 'generation', 'judge_stats',
      'wall_times_s' and (with ifeval) 'ifeval'.
    """
    if judge_kind not in JUDGE_KINDS:
        raise UserError(f"Unknown judge kind {judge_kind!r}; use one of {', '.join(JUDGE_KINDS)}.")
    if ifeval:  # Before hours of generation: its checkers are an optional extra.
        from lsp_jax.eval import ifeval as ifeval_lib

        ifeval_lib.require_checkers()
    clock = _Clock(log)
    budgets = {"model": max_new_tokens, "baseline": baseline_max_new_tokens or max_new_tokens}
    names = names or _display_names(model_source, baseline_source, budgets)
    with clock.phase("load"):
        prompt_source, prompts = _load_prompt_list(prompts, limit)
        cache = ModelCache(dtype=dtype)
        models = {"model": cache.get(model_source), "baseline": cache.get(baseline_source)}
        judge = cache.get(judge_source)
        check_judge(judge, judge_kind)
    sampling = dict(temperature=temperature, batch_size=batch_size, seed=seed, progress=progress)
    generate = lambda model, texts, budget, desc: sample_answers(
        model.config, model.params, model.chat, texts, max_new_tokens=budget, desc=desc, **sampling
    )
    answers = {}
    for role, model in models.items():
        with clock.phase(f"generate {role}"):
            answers[role] = generate(model, prompts, budgets[role], f"generate {role}")
    with clock.phase("judge"):
        judgement = judge_pairs(
            judge,
            prompts,
            answers["model"].texts,
            answers["baseline"].texts,
            kind=judge_kind,
            batch_size=judge_batch_size or batch_size,
            pairwise_prompt=pairwise_prompt,
            progress=progress,
        )
    with clock.phase("statistics"):
        stats = dict(tie_value=tie_value, n_boot=n_boot, seed=seed)
        summary = _summarize(prompts, answers, judgement, **stats)
    summary["setup"] = {
        "model": os.fspath(model_source),
        "baseline": os.fspath(baseline_source),
        "judge": os.fspath(judge_source),
        "judge_kind": judge_kind,
        "prompts": prompt_source,
        "n_prompts": len(prompts),
        "sampling": dict(temperature=temperature, max_new_tokens=budgets, seed=seed),
        "length_unit": LENGTH_UNIT,
        "names": names,
    }
    if ifeval:
        roles = {role: (models[role], budgets[role]) for role in models}
        with clock.phase("ifeval"):
            summary["ifeval"] = _ifeval_phase(
                roles, ifeval, limit=ifeval_limit, out_dir=out_dir, generate=generate
            )
    summary["wall_times_s"] = dict(clock.times)
    if out_dir:
        paths = _write_outputs(out_dir, summary, prompts, answers, judgement, names)
        log("[eval] wrote " + ", ".join(paths.values()))
    return summary


def _load_prompt_list(prompts, limit):
    """(description, list[data.Prompt]) from a prompt source or a list of prompts."""
    if isinstance(prompts, str | os.PathLike):
        return os.fspath(prompts), data.load_prompts(prompts, limit=limit)
    prompts = [p if hasattr(p, "text") else data.Prompt(str(p)) for p in prompts]
    return "given", prompts[:limit]


def _summarize(prompts, answers, judgement, **options):
    """winrate.summarize on character lengths, plus answer and judge statistics."""
    summary = winrate.summarize(
        judgement["preference"],
        [p.category for p in prompts],
        [len(t) for t in answers["model"].texts],
        [len(t) for t in answers["baseline"].texts],
        **options,
    )
    summary["generation"] = {role: _answer_stats(answers[role]) for role in answers}
    summary["judge_stats"] = _judge_stats(judgement)
    summary["majority"] = _majority_summary(prompts, answers, judgement, **options)
    return summary


def majority_preferences(preferences):
    """Each soft preference rounded to its side: 1 above 0.5, 0 below, 0.5 at exactly 0.5.

    A weak pairwise judge gives soft preferences close to 0.5 (its two orders mostly
    disagree), so the soft win rate stays near 50 %; the rounded one counts on which side of
    0.5 each pair falls.
    """
    prefs_P = np.asarray([np.nan if p is None else p for p in preferences], np.float64)
    return np.where(prefs_P > 0.5, 1.0, np.where(prefs_P < 0.5, 0.0, prefs_P)).tolist()


def _majority_summary(prompts, answers, judgement, **options):
    """Win rates of the rounded preferences (overall and per category; no LC fit)."""
    full = winrate.summarize(
        majority_preferences(judgement["preference"]),
        [p.category for p in prompts],
        [len(t) for t in answers["model"].texts],
        [len(t) for t in answers["baseline"].texts],
        **options,
    )
    keep = ("n", "win_rate", "win_rate_ci")
    groups = {winrate.OVERALL: full[winrate.OVERALL]} | full["categories"]
    return {name: {k: stats[k] for k in keep} for name, stats in groups.items()}


def _display_names(model_source, baseline_source, budgets) -> dict:
    model, baseline = source_name(model_source), source_name(baseline_source)
    if baseline == model:
        if budgets["baseline"] != budgets["model"]:
            baseline = f"{baseline} ({budgets['baseline']} tokens)"
        else:
            baseline = f"{baseline} (baseline)"
    return {"model": model, "baseline": baseline}


def evaluate_policy(
    config: LlamaConfig,
    params,
    reference_params,
    chat,
    prompts,
    *,
    max_new_tokens: int = 256,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    tie_value: float = winrate.TIE,
    n_boot: int = 200,
    pairwise_prompt: PairwisePrompt | None = None,
    reference_config=None,
) -> dict:
    """Win rate of the current policy against the reference on held-out prompts, judged
    pairwise by the reference (for `eval.every` in the training loop). reference_config:
    the reference's architecture when it differs from `config` (a LoRA policy's base).

    Returns:
      The winrate summary dict plus 'judge_stats'; no files are written.
    """
    reference_config = reference_config or config
    reference = EvalModel("reference", reference_config, reference_params, chat)
    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed
    )
    policy_texts = sample_answers(config, params, chat, prompts, **options).texts
    reference_texts = sample_answers(
        reference_config, reference_params, chat, prompts, **options
    ).texts
    judgement = judge_pairs(
        reference,
        prompts,
        policy_texts,
        reference_texts,
        kind=PAIRWISE,
        batch_size=batch_size,
        pairwise_prompt=pairwise_prompt,
    )
    summary = winrate.summarize(
        judgement["preference"],
        [getattr(p, "category", data.DEFAULT_CATEGORY) for p in prompts],
        [len(t) for t in policy_texts],
        [len(t) for t in reference_texts],
        tie_value=tie_value,
        n_boot=n_boot,
        seed=seed,
    )
    summary["judge_stats"] = _judge_stats(judgement)
    return summary
