"""Run outputs: metrics JSONL, samples JSONL, TensorBoard events, a progress line."""

import json
import math
import os

import numpy as np


def _jsonable(value):
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return value.tolist()


class MetricsWriter:
    """Appends one JSON line per step to WORKDIR/metrics.jsonl and WORKDIR/samples.jsonl,
    and writes TensorBoard events (tensorboardX, no TensorFlow) to WORKDIR/tensorboard."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self._metrics = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._samples = open(os.path.join(workdir, "samples.jsonl"), "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write_metrics(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: _jsonable(v) for k, v in sorted(metrics.items())}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def write_samples(self, step: int, samples: list[dict]) -> None:
        for sample in samples:
            self._samples.write(json.dumps({"step": int(step), **sample}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._metrics.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()


def summary_line(step: int, metrics: dict, keys: tuple[str, ...]) -> str:
    """`step 12 | reward/solver 0.41 | ...` with the keys that are present."""
    parts = [f"step {step}"]
    for key in keys:
        if key in metrics and metrics[key] is not None:
            parts.append(f"{key} {float(metrics[key]):.4g}")
    return " | ".join(parts)


class NullWriter:
    """Stands in for MetricsWriter on the hosts of a pod that do not write."""

    def write_metrics(self, step, metrics):
        pass

    def write_samples(self, step, samples):
        pass

    def close(self):
        pass
