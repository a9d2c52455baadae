"""Win-rate statistics of a model against a baseline: raw and length-controlled, with intervals.

Input is one judge preference per prompt pair: 1.0 the model's answer is better, 0.0 the
baseline's is better, exactly 0.5 a tie (scored as `tie_value`), other values in (0, 1) soft
preferences used as they are, NaN or None no verdict (left out and counted as missing).
Win rates are reported in percent.

Length-controlled (LC) win rate, in the spirit of AlpacaEval's: per group, fit a logistic
regression of the preference on the feature f = tanh((len_model - len_baseline) / sd), where sd
is the standard deviation of the length differences in the group,

    logit P(model preferred) = a + b f,

with a weak ridge penalty on b (keeps the fit finite when wins are separated by length), and
report sigmoid(a): the predicted win rate at zero length difference. With equal lengths f = 0
and the LC win rate equals the raw one.

Intervals are percentile bootstraps over prompts (resampled within each group), seeded.
Array suffixes: P prompt pairs, B bootstrap replicates.
"""

import json
import math
import os

import numpy as np
from scipy import special

TIE = 0.5
CONFIDENCE = 0.95
# Ridge penalty on the length coefficient b, in units of log-likelihood (one prompt's worth).
LC_L2 = 1.0
_NEWTON_STEPS = 100
_MAX_NEWTON_STEP = 4.0
OVERALL = "overall"
_RATE_KEYS = (
    "win_rate",
    "win_rate_ci",
    "lc_win_rate",
    "lc_win_rate_ci",
    "length_coef",
    "avg_length_model",
    "avg_length_baseline",
)


def preference_scores(prefs, *, tie_value=TIE):
    """Turns raw preferences into scores in [0, 1] (ties -> tie_value, missing -> NaN).

    Args:
      prefs: sequence of P floats in [0, 1], NaN or None.
      tie_value: the score a tie (exactly 0.5) counts as.

    Returns:
      scores_P float64, NaN where the judge gave no verdict.
    """
    prefs_P = np.array([np.nan if p is None else p for p in prefs], dtype=np.float64)
    valid_P = ~np.isnan(prefs_P)
    if np.any((prefs_P[valid_P] < 0) | (prefs_P[valid_P] > 1)):
        raise ValueError("Preferences must lie in [0, 1] (1 model better, 0 baseline better).")
    if not 0.0 <= tie_value <= 1.0:
        raise ValueError(f"tie_value must lie in [0, 1], got {tie_value}.")
    return np.where(prefs_P == TIE, tie_value, prefs_P)


def length_feature(len_model_P, len_baseline_P):
    """f_P = tanh(length difference / its standard deviation); zeros if all differences agree."""
    diff_P = np.asarray(len_model_P, np.float64) - np.asarray(len_baseline_P, np.float64)
    scale = diff_P.std()
    if scale == 0.0:
        return np.zeros_like(diff_P)
    return np.tanh(diff_P / scale)


def fit_length_logistic(y_P, f_P, weights_BP, *, l2=LC_L2):
    """Fits logit p = a + b f by Newton's method, one weighted fit per row of weights_BP.

    Maximizes sum_P w (y log p + (1 - y) log(1 - p)) - l2 b^2 / 2 with soft targets y in [0, 1].

    Args:
      y_P: targets in [0, 1].
      f_P: the length feature.
      weights_BP: non-negative weights (bootstrap counts; ones for the plain fit).
      l2: ridge penalty on b (a is not penalized, so a alone reproduces the mean of y).

    Returns:
      (a_B, b_B) float64.
    """
    a_B = np.zeros(weights_BP.shape[0])
    b_B = np.zeros(weights_BP.shape[0])
    for _ in range(_NEWTON_STEPS):
        p_BP = special.expit(a_B[:, None] + b_B[:, None] * f_P)
        residual_BP = weights_BP * (y_P - p_BP)
        grad_a_B, grad_b_B = residual_BP.sum(-1), residual_BP @ f_P - l2 * b_B
        curvature_BP = weights_BP * p_BP * (1.0 - p_BP)
        # The 2x2 negative Hessian [[h_aa, h_ab], [h_ab, h_bb]], solved in closed form. A tiny
        # jitter keeps it invertible when every target is 0 or 1 (then a -> +-inf).
        h_aa_B = curvature_BP.sum(-1) + 1e-12
        h_ab_B = curvature_BP @ f_P
        h_bb_B = curvature_BP @ (f_P * f_P) + l2 + 1e-12
        det_B = h_aa_B * h_bb_B - h_ab_B * h_ab_B
        step_a_B = (h_bb_B * grad_a_B - h_ab_B * grad_b_B) / det_B
        step_b_B = (h_aa_B * grad_b_B - h_ab_B * grad_a_B) / det_B
        # Clipped steps keep the undamped Newton iteration from overshooting on separable data.
        largest_B = np.maximum(np.abs(step_a_B), np.abs(step_b_B))
        shrink_B = np.minimum(1.0, _MAX_NEWTON_STEP / np.maximum(largest_B, 1e-300))
        a_B, b_B = a_B + shrink_B * step_a_B, b_B + shrink_B * step_b_B
        # Done when steps vanish, or when the gradient does (targets all 0 or all 1 send a
        # towards infinity one unit per step; sigmoid(a) is then exact to 1e-9).
        tiny_gradient = np.max(np.abs(grad_a_B) + np.abs(grad_b_B)) < 1e-9 * weights_BP.shape[-1]
        if np.max(largest_B) < 1e-12 or tiny_gradient:
            break
    return a_B, b_B


def _interval(values_B, confidence):
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values_B, [tail, 1.0 - tail])
    return [float(low), float(high)]


def summarize_group(
    scores_P, len_model_P, len_baseline_P, *, n_boot, rng, confidence=CONFIDENCE, l2=LC_L2
):
    """Rates, intervals and lengths of one group of pairs (NaN scores are missing verdicts)."""
    valid_P = ~np.isnan(scores_P)
    y_P = scores_P[valid_P]
    n = int(y_P.size)
    stats = {"n": n, "n_missing": int(scores_P.size - n)}
    if n == 0:
        return stats | dict.fromkeys(_RATE_KEYS)  # No verdicts: nothing to estimate.
    len_model_P = np.asarray(len_model_P, np.float64)[valid_P]
    len_baseline_P = np.asarray(len_baseline_P, np.float64)[valid_P]
    f_P = length_feature(len_model_P, len_baseline_P)
    counts_BP = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    a_1, b_1 = fit_length_logistic(y_P, f_P, np.ones((1, n)), l2=l2)
    a_B, _ = fit_length_logistic(y_P, f_P, counts_BP, l2=l2)
    return stats | {
        "win_rate": 100.0 * float(y_P.mean()),
        "win_rate_ci": _interval(100.0 * (counts_BP @ y_P) / n, confidence),
        "lc_win_rate": 100.0 * float(special.expit(a_1[0])),
        "lc_win_rate_ci": _interval(100.0 * special.expit(a_B), confidence),
        "length_coef": float(b_1[0]),
        "avg_length_model": float(len_model_P.mean()),
        "avg_length_baseline": float(len_baseline_P.mean()),
    }


def summarize(
    prefs,
    categories,
    len_model,
    len_baseline,
    *,
    tie_value=TIE,
    n_boot=1000,
    seed=0,
    confidence=CONFIDENCE,
    l2=LC_L2,
):
    """Per-category and overall win rates of the model against the baseline.

    Args:
      prefs: P judge preferences (see the module docstring).
      categories: P category names.
      len_model, len_baseline: P answer lengths (tokens or characters, as long as both agree).
      tie_value: score of a tie (0.5 counts ties as half a win).
      n_boot: bootstrap replicates for the intervals.
      seed: seeds the bootstrap.
      confidence: interval coverage.
      l2: ridge penalty on the length coefficient of the LC fit.

    Returns:
      {'overall': stats, 'categories': {name: stats}, 'settings': {...}} where stats has n,
      n_missing, wins, losses, ties, win_rate, win_rate_ci, lc_win_rate, lc_win_rate_ci,
      length_coef, avg_length_model, avg_length_baseline (rates in percent).
    """
    sizes = {len(prefs), len(categories), len(len_model), len(len_baseline)}
    if len(sizes) != 1:
        raise ValueError(
            f"prefs, categories, len_model and len_baseline differ in length: {sorted(sizes)}."
        )
    raw_P = preference_scores(prefs, tie_value=TIE)
    scores_P = preference_scores(prefs, tie_value=tie_value)
    categories_P = np.asarray(categories, dtype=object)
    len_model_P = np.asarray(len_model, np.float64)
    len_baseline_P = np.asarray(len_baseline, np.float64)
    names = [OVERALL] + sorted(set(categories_P.tolist()))
    groups = {}
    for k, name in enumerate(names):
        mask_P = np.ones(raw_P.shape, bool) if name == OVERALL else categories_P == name
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        stats = summarize_group(
            scores_P[mask_P],
            len_model_P[mask_P],
            len_baseline_P[mask_P],
            n_boot=n_boot,
            rng=rng,
            confidence=confidence,
            l2=l2,
        )
        groups[name] = stats | _outcome_counts(raw_P[mask_P])
    return {
        OVERALL: groups.pop(OVERALL),
        "categories": groups,
        "settings": {
            "tie_value": tie_value,
            "n_boot": n_boot,
            "seed": seed,
            "confidence": confidence,
            "lc_l2": l2,
        },
    }


def _outcome_counts(raw_P):
    """Wins, losses and ties counted from the judge's raw preferences (ties are exactly 0.5)."""
    valid_P = raw_P[~np.isnan(raw_P)]
    return {
        "wins": int(np.sum(valid_P > TIE)),
        "losses": int(np.sum(valid_P < TIE)),
        "ties": int(np.sum(valid_P == TIE)),
    }


def _rate(value, interval):
    if value is None:
        return "n/a"
    return f"{value:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def _length(value):
    return "n/a" if value is None else f"{value:.1f}"


def format_markdown(summary, *, model_name="model", baseline_name="baseline"):
    """A markdown table: one row per category, then the overall row."""
    percent = round(100 * summary["settings"]["confidence"])
    lines = [
        f"Win rate of {model_name} against {baseline_name} (percent, {percent}% bootstrap "
        f"intervals; ties count {summary['settings']['tie_value']}).",
        "",
        "| category | n | win rate | LC win rate | wins / losses / ties | missing "
        f"| avg length {model_name} | avg length {baseline_name} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(summary["categories"].items()) + [(f"**{OVERALL}**", summary[OVERALL])]
    for name, stats in rows:
        lines.append(
            f"| {name} | {stats['n']} | {_rate(stats['win_rate'], stats['win_rate_ci'])} "
            f"| {_rate(stats['lc_win_rate'], stats['lc_win_rate_ci'])} "
            f"| {stats['wins']} / {stats['losses']} / {stats['ties']} | {stats['n_missing']} "
            f"| {_length(stats['avg_length_model'])} "
            f"| {_length(stats['avg_length_baseline'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_summary(summary, path, *, title="Win rate against the baseline"):
    """Bar chart per category (and overall): raw and LC win rates with their intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(summary["categories"].items()) + [(OVERALL, summary[OVERALL])]
    rows = [(name, stats) for name, stats in rows if stats["n"]]
    positions = np.arange(len(rows))
    figure = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2.0), 4.5), dpi=100)
    FigureCanvasAgg(figure)  # Agg without pyplot: no global backend state is touched.
    axes = figure.add_subplot()
    width = 0.38
    for offset, key, label in (
        (-width / 2, "win_rate", "win rate"),
        (width / 2, "lc_win_rate", "length-controlled"),
    ):
        values = np.array([stats[key] for _, stats in rows])
        intervals = np.array([stats[key + "_ci"] for _, stats in rows]).reshape(-1, 2)
        errors = np.abs(intervals.T - values[None, :])
        axes.bar(positions + offset, values, width, yerr=errors, capsize=3, label=label)
    axes.axhline(50.0, color="grey", linewidth=1, linestyle="--")
    axes.set_xticks(positions, [name for name, _ in rows], rotation=20)
    axes.set_ylim(0, 100)
    axes.set_ylabel("win rate (%)")
    axes.set_title(title)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def write_report(summary, out_dir, *, model_name="model", baseline_name="baseline"):
    """Writes winrate.json, winrate.md and winrate.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"winrate.{name}") for name in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_jsonable(summary), f, indent=2)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(format_markdown(summary, model_name=model_name, baseline_name=baseline_name))
    plot_summary(summary, paths["png"], title=f"{model_name} against {baseline_name}")
    return paths
