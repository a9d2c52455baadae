"""Run outputs: metrics JSONL, samples JSONL, TensorBoard events, optional Weights &
Biases, a progress line."""

import json
import logging
import os
import secrets
import shutil
import tempfile
import time

import numpy as np

from lsp_jax.errors import UserError
from lsp_jax.runtime import paths

WANDB_ID_FILE = "wandb_run_id"  # In WORKDIR: a resumed run logs to the same W&B run.


def _jsonable(value):
    """A JSON-ready Python value. NaN and ±inf stay floats: json.dumps writes them as
    NaN / Infinity / -Infinity (which json.loads, pandas and jq read), so a diverging
    run's metrics say so instead of showing null."""
    value = np.asarray(value)
    if value.ndim == 0:
        return value.item()
    return value.tolist()


def _line_step(line: str) -> int | None:
    """The "step" of one JSONL record, or None for a line that is not one (a line cut
    off by a kill in the middle of a write)."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def keep_through_step(text: str, step: int) -> str:
    """The lines of a metrics or samples JSONL text up to iteration `step`: what a run
    resumed from the checkpoint of `step` keeps (it writes the later ones again)."""
    kept = []
    for line in text.splitlines(keepends=True):
        line_step = _line_step(line)
        if line_step is not None and line_step <= step and line.endswith("\n"):
            kept.append(line)
    return "".join(kept)


class MetricsWriter:
    """Appends one JSON line per step to WORKDIR/metrics.jsonl and WORKDIR/samples.jsonl,
    and writes TensorBoard events (tensorboardX, no TensorFlow) to WORKDIR/tensorboard.

    WORKDIR may be a URI (gs://bucket/run, see lsp_jax.runtime.paths). Object stores cannot
    append, so there each JSONL file is kept in memory (with the lines already there when
    a run resumes) and rewritten whole at every write, and the events are written to a
    local temporary file copied up after every flush. A rewrite costs the size of the
    file: fine for thousands of lines, and GCS allows about one write per second to one
    object, so log every step only when a step takes a second or more.
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        wandb_project: str | None = None,
        run_config: dict | None = None,
    ):
        """resume_step: the iteration the run (re)starts from; lines of later iterations,
        written before a crash or kill after the last checkpoint, are dropped so that
        the resumed run does not log those iterations twice. None keeps every line.
        wandb_project: also log every metrics row to this Weights & Biases project (one
        W&B run per WORKDIR, resumed with it; run_config is its config)."""
        self._tb = None
        self._wandb = None
        if wandb_project:
            self._wandb = _WandbRun(workdir, wandb_project, run_config or {})
        # NaN and inf are logged on purpose (a diverging run); not one warning each.
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        if paths.is_remote(workdir):
            paths.check_backend(workdir)
            self._metrics = _RewrittenObject(paths.join(workdir, "metrics.jsonl"), resume_step)
            self._samples = _RewrittenObject(paths.join(workdir, "samples.jsonl"), resume_step)
            if tensorboard:
                self._tb = _StagedTensorBoard(paths.join(workdir, "tensorboard"))
            return
        os.makedirs(workdir, exist_ok=True)
        self._metrics = _open_for_append(os.path.join(workdir, "metrics.jsonl"), resume_step)
        self._samples = _open_for_append(os.path.join(workdir, "samples.jsonl"), resume_step)
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
        if self._wandb is not None:
            self._wandb.log(step, record)

    def write_samples(self, step: int, samples: list[dict]) -> None:
        for sample in samples:
            self._samples.write(json.dumps({"step": int(step), **sample}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._metrics.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def _open_for_append(path: str, resume_step: int | None):
    """A local JSONL file opened for appending, cut back to `resume_step` first."""
    if resume_step is not None and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        kept = keep_through_step(text, resume_step)
        if kept != text:
            paths.write_text(path, kept)
    return open(path, "a", encoding="utf-8")


class _RewrittenObject:
    """A text file on an object store, written like a file opened in append mode: the
    whole content (earlier lines included) is rewritten as one object at each flush."""

    def __init__(self, path: str, resume_step: int | None = None):
        self._path = path
        self._data = bytearray(paths.read_bytes(path) if paths.exists(path) else b"")
        self._dirty = False
        if resume_step is not None:
            text = self._data.decode("utf-8", errors="replace")
            kept = keep_through_step(text, resume_step)
            if kept != text:
                self._data = bytearray(kept.encode("utf-8"))
                self._dirty = True
                self.flush()

    def write(self, text: str) -> None:
        self._data += text.encode("utf-8")
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            paths.write_bytes(self._path, bytes(self._data))
            self._dirty = False

    def close(self) -> None:
        self.flush()


class _StagedTensorBoard:
    """TensorBoard scalars for a remote folder: events written synchronously to a local
    temporary file (tensorboardX's SummaryWriter writes from a thread, so a copy made after
    its flush could miss the last events), the file copied up after each flush."""

    def __init__(self, remote_dir: str):
        from tensorboardX.event_file_writer import EventsWriter

        self._remote_dir = remote_dir
        self._local_dir = tempfile.mkdtemp(prefix="lsp_jax_tensorboard_")
        # The name holds the time in seconds and the host; the random suffix keeps a run
        # resumed within the same second from replacing the earlier events object.
        suffix = "." + secrets.token_hex(4)
        self._events = EventsWriter(os.path.join(self._local_dir, "events"), suffix)

    def add_scalar(self, tag: str, value, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        event = Event(wall_time=time.time(), step=int(step), summary=scalar(tag, value))
        self._events.write_event(event)

    def flush(self) -> None:
        self._events.flush()
        paths.upload_tree(self._local_dir, self._remote_dir)

    def close(self) -> None:
        self._events.close()
        paths.upload_tree(self._local_dir, self._remote_dir)
        shutil.rmtree(self._local_dir, ignore_errors=True)


def check_wandb() -> None:
    """Raises UserError when train.wandb_project is set but wandb is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(
            "train.wandb_project is set, but Weights & Biases is not installed. Fix: pip "
            "install wandb (and `wandb login`, or WANDB_MODE=offline), or leave "
            "train.wandb_project unset (TensorBoard and metrics.jsonl are always written)."
        ) from None


class _WandbRun:
    """One W&B run per WORKDIR: its id is kept in WORKDIR/wandb_run_id, so that a resumed
    run goes on logging to it. wandb's own files go to WORKDIR/wandb (a local workdir) or
    to wandb's default folder. W&B keeps one value per step: iterations that a resumed
    run logs again (after a kill before the next checkpoint) are not rewritten there."""

    def __init__(self, workdir: str, project: str, config: dict):
        import wandb

        id_path = paths.join(workdir, WANDB_ID_FILE)
        if paths.exists(id_path):
            run_id = paths.read_text(id_path).strip()
        else:
            run_id = secrets.token_hex(8)
            paths.write_text(id_path, run_id + "\n")
        local = None if paths.is_remote(workdir) else workdir  # wandb adds /wandb.
        self._run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            name=os.path.basename(workdir.rstrip("/")),
            dir=local,
            config=config,
        )

    def log(self, step: int, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if step >= self._run.step:  # W&B refuses steps it has passed (see above).
            self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


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
