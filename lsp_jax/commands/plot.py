"""`lsp-jax plot WORKDIR`: one PNG of curves per metric group of a run's metrics.jsonl.

metrics.jsonl holds one JSON object per line: an integer "step" and float metrics whose keys
are grouped by the prefix before the first slash ("reward/solver", "kl/challenger", ...;
the win-rate probe's lengths and seconds get panels of their own).
Each group becomes WORKDIR/plots/<group>.png (or --out), every key of the group a curve
against step. Keys without a slash go into the group "other". When a resumed run logs a step
again, its last value is kept.
"""

import io
import json
import math
import os

from lsp_jax.errors import UserError
from lsp_jax.runtime import paths

METRICS_FILE = "metrics.jsonl"
OTHER_GROUP = "other"
# Groups whose keys come in different units get one panel per unit: (text in the key after
# the group's slash, panel). The win-rate probe logs percentages, lengths in characters and
# seconds under "eval/"; on one axis the win rate would be a flat line at the bottom.
SPLIT_GROUPS = {"eval": (("length", "eval_length"), ("seconds", "eval_time"))}


def add_arguments(parser):
    parser.add_argument("workdir", help="Training run folder holding metrics.jsonl.")
    parser.add_argument("--out", default=None, help="Folder for the PNGs (default WORKDIR/plots).")


def read_metrics(path):
    """Reads metrics.jsonl into {key: {step: value}} (non-numeric values are skipped)."""
    series = {}
    # newline=None: universal newlines, as open() in text mode.
    with io.StringIO(paths.read_text(path), newline=None) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_line(line, f"{path}, line {line_number}")
            step = record["step"]
            for key, value in record.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                series.setdefault(key, {})[step] = float(value)
    return series


def _parse_line(line, where):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}).") from None
    if not isinstance(record, dict) or "step" not in record:
        raise UserError(f"{where}: each line must be a JSON object with an integer 'step'.")
    if isinstance(record["step"], bool) or not isinstance(record["step"], int | float):
        raise UserError(f"{where}: 'step' must be an integer, got {record['step']!r}.")
    return record


def group_keys(keys):
    """{group: sorted keys}, the group being the text before the first slash (keys of
    another unit in a SPLIT_GROUPS group go to that unit's own group)."""
    groups = {}
    for key in sorted(keys):
        group, _, rest = key.partition("/") if "/" in key else (OTHER_GROUP, "", key)
        for text, panel in SPLIT_GROUPS.get(group, ()):
            if text in rest:
                group = panel
                break
        groups.setdefault(group, []).append(key)
    return groups


def plot_group(group, keys, series, path):
    """Draws every key of one group against step into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)  # Agg without pyplot: no global backend state is touched.
    axes = figure.add_subplot()
    for key in keys:
        points = sorted((s, v) for s, v in series[key].items() if math.isfinite(v))
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
    axes.set_xlabel("step")
    axes.set_title(group)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def plot_metrics(workdir, out_dir=None):
    """Writes one PNG per metric group; returns the paths in group order."""
    path = paths.join(workdir, METRICS_FILE)
    if not paths.isfile(path):
        raise UserError(
            f"No {METRICS_FILE} in {workdir}: pass the workdir of a training run "
            "(`lsp-jax train ... --workdir DIR` writes DIR/metrics.jsonl)."
        )
    series = read_metrics(path)
    if not series:
        raise UserError(f"{path} holds no numeric metrics to plot.")
    out_dir = out_dir or paths.join(workdir, "plots")
    written = []
    with paths.staging_dir(out_dir) as local_dir:  # Uploaded at the end if out_dir is remote.
        os.makedirs(local_dir, exist_ok=True)
        for group, keys in group_keys(series).items():
            name = group.replace(os.sep, "_") + ".png"
            plot_group(group, keys, series, os.path.join(local_dir, name))
            written.append(paths.join(out_dir, name))
    return written


def run(args):
    for path in plot_metrics(args.workdir, args.out):
        print(path)
    return 0
