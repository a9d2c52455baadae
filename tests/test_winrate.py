"""Win-rate statistics: exact rates, ties, bootstrap intervals, the length-controlled variant."""

import json
import math

import numpy as np
import pytest
from scipy import optimize, special

from lsp_jax.eval import winrate


def _summary(prefs, categories=None, len_model=None, len_baseline=None, **kwargs):
    n = len(prefs)
    categories = ["c"] * n if categories is None else categories
    len_model = [100.0] * n if len_model is None else len_model
    len_baseline = [100.0] * n if len_baseline is None else len_baseline
    kwargs.setdefault("n_boot", 200)
    return winrate.summarize(prefs, categories, len_model, len_baseline, **kwargs)


def _length_driven_data(n, seed):
    """The model is longer on average and wins only through length (no intrinsic quality)."""
    rng = np.random.default_rng(seed)
    diff_P = rng.normal(60.0, 100.0, n)
    feature_P = np.tanh(diff_P / diff_P.std())
    prefs_P = (rng.random(n) < special.expit(3.0 * feature_P)).astype(float)
    return prefs_P, 300.0 + diff_P, np.full(n, 300.0)


def test_all_ties_is_fifty_percent():
    stats = _summary([0.5] * 40)["overall"]
    assert stats["win_rate"] == 50.0 and stats["win_rate_ci"] == [50.0, 50.0]
    assert stats["lc_win_rate"] == pytest.approx(50.0, abs=1e-9)
    assert (stats["wins"], stats["losses"], stats["ties"]) == (0, 0, 40)


def test_known_preferences_give_exact_rates():
    prefs = [1, 1, 0, 1, 0.5, 0, 1, math.nan, None]
    categories = ["a", "a", "a", "a", "b", "b", "b", "b", "b"]
    summary = _summary(prefs, categories)
    assert summary["overall"]["win_rate"] == pytest.approx(100 * 4.5 / 7)
    assert summary["overall"]["n"] == 7 and summary["overall"]["n_missing"] == 2
    assert summary["categories"]["a"]["win_rate"] == pytest.approx(75.0)
    assert summary["categories"]["b"]["win_rate"] == pytest.approx(100 * 1.5 / 3)
    assert summary["categories"]["b"]["n_missing"] == 2
    assert (
        summary["overall"]["wins"],
        summary["overall"]["losses"],
        summary["overall"]["ties"],
    ) == (4, 2, 1)


@pytest.mark.parametrize("tie_value,expected", [(0.0, 25.0), (0.5, 50.0), (1.0, 75.0)])
def test_tie_value(tie_value, expected):
    stats = _summary([1, 0.5, 0, 0.5], tie_value=tie_value)["overall"]
    assert stats["win_rate"] == pytest.approx(expected)
    assert stats["ties"] == 2  # ties stay ties in the counts, whatever they score


def test_soft_preferences_are_averaged():
    assert _summary([0.9, 0.2, 0.7])["overall"]["win_rate"] == pytest.approx(60.0)


def test_average_lengths():
    stats = _summary([1, 0, 1], len_model=[10, 20, 60], len_baseline=[5, 5, 20])["overall"]
    assert stats["avg_length_model"] == pytest.approx(30.0)
    assert stats["avg_length_baseline"] == pytest.approx(10.0)


def test_bootstrap_contains_estimate_and_shrinks():
    widths = []
    for n in (40, 640):
        rng = np.random.default_rng(n)
        prefs = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.3, 0.1, 0.6])
        lengths = rng.normal(200, 40, n)
        stats = _summary(list(prefs), len_model=lengths, len_baseline=lengths[::-1], n_boot=1000)[
            "overall"
        ]
        for key in ("win_rate", "lc_win_rate"):
            low, high = stats[key + "_ci"]
            assert low <= stats[key] <= high
        low, high = stats["win_rate_ci"]
        widths.append(high - low)
        # Percentile bootstrap of a mean: close to the normal interval 2 * 1.96 * sd / sqrt(n).
        scores = np.where(prefs == 0.5, 0.5, prefs)
        normal_width = 2 * 1.96 * 100 * scores.std() / math.sqrt(n)
        assert (high - low) == pytest.approx(normal_width, rel=0.2)
    assert widths[1] < widths[0] / 2.5  # 16x more prompts: about 4x narrower


def test_bootstrap_is_seeded():
    prefs = [1, 0, 1, 1, 0, 0.5, 1, 0] * 5
    first = _summary(prefs, seed=3)
    assert first == _summary(prefs, seed=3)
    assert first["overall"]["win_rate_ci"] != _summary(prefs, seed=4)["overall"]["win_rate_ci"]


def test_lc_equals_raw_when_lengths_equal():
    rng = np.random.default_rng(0)
    prefs = list(rng.choice([0.0, 0.5, 1.0, 0.8], size=120))
    categories = list(rng.choice(["x", "y", "z"], size=120))
    summary = _summary(prefs, categories, len_model=[250] * 120, len_baseline=[250] * 120)
    for stats in [summary["overall"], *summary["categories"].values()]:
        assert stats["lc_win_rate"] == pytest.approx(stats["win_rate"], abs=1e-6)


def test_lc_moves_to_fifty_when_wins_come_from_length():
    prefs, len_model, len_baseline = _length_driven_data(2000, seed=1)
    stats = _summary(list(prefs), len_model=len_model, len_baseline=len_baseline)["overall"]
    assert stats["win_rate"] > 65.0  # raw: length makes the model look good
    assert abs(stats["lc_win_rate"] - 50.0) < 4.0
    assert abs(stats["lc_win_rate"] - 50.0) < abs(stats["win_rate"] - 50.0) / 4
    assert stats["length_coef"] > 1.5


def test_lc_keeps_quality_unrelated_to_length():
    rng = np.random.default_rng(2)
    n = 2000
    prefs = (rng.random(n) < 0.75).astype(float)  # wins whatever the lengths
    len_model = rng.normal(300, 80, n)
    stats = _summary(list(prefs), len_model=len_model, len_baseline=[300.0] * n)["overall"]
    assert stats["lc_win_rate"] == pytest.approx(stats["win_rate"], abs=2.0)


def test_logistic_fit_matches_scipy():
    prefs, len_model, len_baseline = _length_driven_data(300, seed=5)
    prefs[::7] = 0.5  # soft targets too
    feature_P = winrate.length_feature(len_model, len_baseline)
    weights_P = np.random.default_rng(0).integers(0, 3, 300).astype(float)
    l2 = 2.0

    def loss(beta):
        p_P = special.expit(beta[0] + beta[1] * feature_P)
        log_likelihood = prefs * np.log(p_P) + (1 - prefs) * np.log1p(-p_P)
        return -(weights_P * log_likelihood).sum() + 0.5 * l2 * beta[1] ** 2

    reference = optimize.minimize(loss, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    a_B, b_B = winrate.fit_length_logistic(prefs, feature_P, weights_P[None, :], l2=l2)
    np.testing.assert_allclose([a_B[0], b_B[0]], reference, atol=1e-5)


def test_input_checks():
    with pytest.raises(ValueError, match="differ in length"):
        winrate.summarize([1, 0], ["a"], [1, 2], [1, 2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _summary([1.5])


def test_report_files(tmp_path):
    from PIL import Image

    prefs, len_model, len_baseline = _length_driven_data(100, seed=0)
    categories = ["helpful_base", "koala", "oasst", "selfinstruct", "vicuna"] * 20
    summary = _summary(list(prefs), categories, len_model, len_baseline)
    paths = winrate.write_report(summary, str(tmp_path), model_name="lsp", baseline_name="base")
    with open(paths["json"]) as f:
        assert json.load(f)["overall"]["win_rate"] == pytest.approx(summary["overall"]["win_rate"])
    with open(paths["md"]) as f:
        table = f.read()
    for name in categories[:5] + ["overall"]:
        assert f"| {name}" in table or f"| **{name}**" in table
    with Image.open(paths["png"]) as image:
        assert image.size == (980, 450)  # 6 groups: figsize (1.3 * 6 + 2, 4.5) at 100 dpi
