"""`lsp-jax plot`: one PNG per metric group from a run's metrics.jsonl."""

import json
import os

import matplotlib.image
import pytest

from lsp_jax import cli
from lsp_jax.commands import plot
from lsp_jax.errors import UserError


def _write_metrics(workdir, records):
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _records():
    records = []
    for step in range(1, 6):
        records.append(
            {
                "step": step,
                "reward/solver": 0.1 * step,
                "reward/challenger": -0.1 * step,
                "kl/solver": 0.01 * step,
                "kl/challenger": 0.02,
                "length/query": 30 + step,
                "length/answer": 200 - step,
                "judge/parse_failures": 0,
                "throughput/tokens_per_s": 1000.0,
                "time/rollout_s": 2.5,
                "loss": 1.0 / step,
            }
        )
    return records


def test_plot_writes_one_png_per_group(tmp_path, capsys):
    workdir = str(tmp_path)
    _write_metrics(workdir, _records())
    assert cli.main(["plot", workdir]) == 0
    printed = capsys.readouterr().out.split()
    groups = ["judge", "kl", "length", "other", "reward", "throughput", "time"]
    assert printed == [os.path.join(workdir, "plots", f"{group}.png") for group in groups]
    image = matplotlib.image.imread(printed[groups.index("reward")])
    assert image.shape[:2] == (400, 700)  # figsize (7, 4) at 100 dpi


def test_plot_out_folder_and_resumed_steps(tmp_path):
    records = _records()
    records.append({"step": 3, "reward/solver": 9.0})  # a resumed run logs step 3 again
    _write_metrics(str(tmp_path), records)
    out = str(tmp_path / "figures")
    assert cli.main(["plot", str(tmp_path), "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "reward.png"))
    series = plot.read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
    assert series["reward/solver"][3] == 9.0  # the last value of a step wins
    assert series["kl/challenger"] == dict.fromkeys(range(1, 6), 0.02)


def test_group_keys():
    keys = ["reward/solver", "reward/challenger", "kl/solver", "loss"]
    assert plot.group_keys(keys) == {
        "kl": ["kl/solver"],
        "other": ["loss"],
        "reward": ["reward/challenger", "reward/solver"],
    }


def test_eval_win_rates_are_not_drawn_on_the_lengths_axis():
    # The probe logs percentages, characters and seconds under eval/: one panel per unit.
    keys = ["eval/win_rate", "eval/lc_win_rate", "eval/avg_length_policy", "eval/seconds"]
    assert plot.group_keys(keys) == {
        "eval": ["eval/lc_win_rate", "eval/win_rate"],
        "eval_length": ["eval/avg_length_policy"],
        "eval_time": ["eval/seconds"],
    }


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    # The CLI may print UserErrors and return non-zero, or let them propagate: accept both.
    try:
        code = cli.main(["plot", str(tmp_path)])
    except UserError as e:
        message = str(e)
    else:
        assert code != 0
        message = capsys.readouterr().err
    assert f"No metrics.jsonl in {tmp_path}" in message


def test_bad_line_names_the_line(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "kl/solver": 0.1}\n{"kl/solver": 0.2}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl, line 2: .*'step'"):
        plot.plot_metrics(str(tmp_path))
