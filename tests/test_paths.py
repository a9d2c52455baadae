"""Run folders on local disk and on an object store (gs://, faked in memory): metrics and
samples JSONL, TensorBoard events, run.json, find_run, staging folders."""

import builtins
import json
import os
import struct
import sys
import tempfile
import types

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX.proto.event_pb2 import Event

from lsp_jax.errors import UserError
from lsp_jax.runtime import checkpoint, paths
from lsp_jax.runtime.metrics import MetricsWriter
from lsp_jax.weights import runs

# `fsspec.registry` is also the name of a read-only mapping; the module holds the tables.
REGISTRY = sys.modules[fsspec.get_filesystem_class.__module__]
WORKDIR = "gs://bucket/run"
INFO = {"model_source": "smollm2-135m-instruct", "scan_layers": False, "config": {"a": [1, 2]}}


class FakeGCS(MemoryFileSystem):
    """An in-memory gs:// store that, like GCS, has no append and no rename. Registered as
    fsspec's 'gcs' protocol, so etils.epath reaches it exactly as it would reach gcsfs."""

    protocol = ("gs", "gcs")
    writes = []  # Paths opened for writing, in order (reset per test).

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode or "+" in mode:
            raise AssertionError(f"append on an object store: {path} mode={mode}")
        if "w" in mode:
            self.writes.append(self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)

    def mv(self, *args, **kwargs):
        raise AssertionError(f"rename on an object store: {args}")


def _clear_epath_cache():
    type(epath_backend.fsspec_backend)._get_filesystem.cache_clear()
    FakeGCS.clear_instance_cache()


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// served by FakeGCS; the current folder and the temporary-file folder are
    empty folders checked after the test, and local file functions refuse URIs."""
    monkeypatch.setattr(FakeGCS, "store", {})
    monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
    monkeypatch.setattr(FakeGCS, "writes", [])
    monkeypatch.setitem(REGISTRY._registry, "gcs", FakeGCS)
    monkeypatch.setenv("EPATH_USE_TF", "0")
    # orbax's GCS client, required of gs:// work folders: no test here reaches it.
    monkeypatch.setitem(sys.modules, "google.cloud.storage", types.ModuleType("storage"))
    _clear_epath_cache()
    for name in ("cwd", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    _refuse_uris(monkeypatch)
    fs = FakeGCS()
    yield fs
    _clear_epath_cache()
    assert os.listdir(tmp_path / "cwd") == [], "a URI was written as a local path"
    assert os.listdir(tmp_path / "tmp") == [], "a local staging folder was left behind"


def _refuse_uris(monkeypatch):
    for module, name in ((builtins, "open"), (os, "replace"), (os, "makedirs"), (os, "rename")):
        original = getattr(module, name)

        def guarded(path, *args, _original=original, _name=name, **kwargs):
            if isinstance(path, str) and "://" in path:
                raise AssertionError(f"local {_name}() called on {path}")
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(module, name, guarded)


def _object(fs, path) -> bytes:
    return fs.cat_file(path)


def _read_events(data: bytes) -> list:
    """Parses a TFRecord file by hand: length (8 bytes), its CRC (4), data, data CRC (4)."""
    events, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        offset += 12
        events.append(Event.FromString(data[offset : offset + length]))
        offset += length + 4
    return events


def _scalars(data: bytes) -> list:
    return [(e.step, v.tag, v.simple_value) for e in _read_events(data) for v in e.summary.value]


def test_uri_helpers():
    assert paths.is_remote("gs://bucket/run") and paths.is_remote("s3://b/x")
    assert not paths.is_remote("/tmp/run") and not paths.is_remote("runs/cpu")
    assert paths.scheme("gs://bucket/run") == "gs" and paths.scheme("runs/a://b") is None
    assert paths.join("gs://bucket/run", "checkpoints", "7") == "gs://bucket/run/checkpoints/7"
    assert paths.join("runs/cpu", "metrics.jsonl") == os.path.join("runs/cpu", "metrics.jsonl")
    assert paths.normalize("gs://bucket/run//") == "gs://bucket/run"
    assert paths.normalize("runs/cpu/") == os.path.abspath("runs/cpu")
    assert paths.dirname("gs://bucket/run/checkpoints") == "gs://bucket/run"
    assert paths.basename("gs://bucket/run/checkpoints") == "checkpoints"


def test_local_metrics_append_across_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')  # From an earlier run.
    first = MetricsWriter(str(tmp_path), tensorboard=False)
    first.write_metrics(1, {"reward/solver": 0.5, "kl": float("nan")})
    first.write_samples(1, [{"query": "q1"}])
    first.close()
    second = MetricsWriter(str(tmp_path), tensorboard=False)
    second.write_metrics(2, {"reward/solver": 0.25})
    second.write_samples(2, [{"query": "é"}, {"query": "q3"}])
    second.close()
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"step": 0}\n'
        '{"step": 1, "kl": NaN, "reward/solver": 0.5}\n'
        '{"step": 2, "reward/solver": 0.25}\n'
    )
    assert (tmp_path / "samples.jsonl").read_text(encoding="utf-8") == (
        '{"step": 1, "query": "q1"}\n{"step": 2, "query": "\\u00e9"}\n{"step": 2, "query": "q3"}\n'
    )


def test_local_run_info_round_trip_and_find_run(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    checkpoint.write_run_info(str(workdir), INFO)
    # Byte for byte what json.dump(info, f, indent=2) wrote before URIs were supported.
    assert (workdir / "run.json").read_text() == json.dumps(INFO, indent=2)
    assert sorted(os.listdir(workdir)) == ["run.json"]  # No temporary file left.
    assert checkpoint.read_run_info(str(workdir)) == INFO
    step = workdir / "checkpoints" / "7"
    step.mkdir(parents=True)
    assert checkpoint.find_run(str(workdir) + "/") == (str(workdir), None)
    assert checkpoint.find_run(step) == (str(workdir), 7)
    assert checkpoint.find_run(tmp_path) is None
    with pytest.raises(UserError, match="run.json is missing"):
        checkpoint.read_run_info(str(tmp_path))


def test_remote_run_info_and_find_run(fake_gcs):
    checkpoint.write_run_info(WORKDIR, INFO)
    assert _object(fake_gcs, f"{WORKDIR}/run.json") == json.dumps(INFO, indent=2).encode()
    assert fake_gcs.writes == ["/bucket/run/run.json"]  # One object write, no temporary.
    assert checkpoint.read_run_info(WORKDIR + "/") == INFO
    assert checkpoint.find_run(WORKDIR + "/") == (WORKDIR, None)
    assert checkpoint.find_run(f"{WORKDIR}/checkpoints/12") == (WORKDIR, 12)
    assert checkpoint.find_run("gs://bucket/other") is None
    assert runs.run_model_source(f"{WORKDIR}/checkpoints/12") == "smollm2-135m-instruct"
    with pytest.raises(UserError, match="run.json is missing"):
        checkpoint.read_run_info("gs://bucket/other")


def test_remote_metrics_rewritten_whole_and_kept_on_resume(fake_gcs):
    metrics, samples = f"{WORKDIR}/metrics.jsonl", f"{WORKDIR}/samples.jsonl"
    fake_gcs.pipe_file(metrics, b'{"step": 0}\n')  # From an earlier run.
    fake_gcs.writes.clear()
    first = MetricsWriter(WORKDIR)
    first.write_metrics(1, {"reward/solver": 0.5, "kl": float("inf")})
    # Visible after each write, not only at close (a preempted run keeps its lines).
    first_lines = b'{"step": 0}\n{"step": 1, "kl": Infinity, "reward/solver": 0.5}\n'
    assert _object(fake_gcs, metrics) == first_lines
    first.write_samples(1, [{"query": "q1"}])
    first.write_samples(1, [])  # Nothing new: no rewrite.
    first.close()
    second = MetricsWriter(WORKDIR)
    second.write_metrics(2, {"reward/solver": 0.25})
    second.write_samples(2, [{"query": "é"}])
    second.close()
    assert _object(fake_gcs, metrics) == (
        b'{"step": 0}\n'
        b'{"step": 1, "kl": Infinity, "reward/solver": 0.5}\n'
        b'{"step": 2, "reward/solver": 0.25}\n'
    )
    assert _object(fake_gcs, samples) == (
        b'{"step": 1, "query": "q1"}\n{"step": 2, "query": "\\u00e9"}\n'
    )
    jsonl_writes = [p for p in fake_gcs.writes if p.endswith(".jsonl")]
    assert jsonl_writes == ["/bucket/run/metrics.jsonl", "/bucket/run/samples.jsonl"] * 2
    # Resumed from the checkpoint of step 1: the lines of step 2 are dropped at once.
    MetricsWriter(WORKDIR, resume_step=1, tensorboard=False).close()
    assert _object(fake_gcs, metrics) == first_lines
    assert _object(fake_gcs, samples) == b'{"step": 1, "query": "q1"}\n'


def test_remote_tensorboard_events_uploaded_per_writer(fake_gcs):
    first = MetricsWriter(WORKDIR)
    first.write_metrics(1, {"reward/solver": 0.5, "text": "not a scalar"})
    [name] = fake_gcs.ls(f"{WORKDIR}/tensorboard", detail=False)
    # Uploaded at the write itself, with the scalar (synchronous events, no lag).
    assert _scalars(_object(fake_gcs, name)) == [(1, "reward/solver", 0.5)]
    first.write_metrics(2, {"reward/solver": 0.25})
    first.close()
    second = MetricsWriter(WORKDIR)  # A resumed run adds its own events file.
    second.write_metrics(3, {"reward/solver": 0.125})
    second.close()
    names = fake_gcs.ls(f"{WORKDIR}/tensorboard", detail=False)
    assert len(names) == 2 and all(".out.tfevents." in n for n in names)
    found = sorted(s for n in names for s in _scalars(_object(fake_gcs, n)))
    assert found == [
        (1, "reward/solver", 0.5),
        (2, "reward/solver", 0.25),
        (3, "reward/solver", 0.125),
    ]
    first_event = _read_events(_object(fake_gcs, name))[0]
    assert first_event.file_version == "brain.Event:2"  # What TensorBoard expects first.


def test_staging_dir_uploads_on_success_only(fake_gcs):
    with paths.staging_dir(f"{WORKDIR}/export/step_000002") as local:
        assert not paths.is_remote(local)
        with open(os.path.join(local, "config.json"), "w") as f:
            f.write("{}")
        os.makedirs(os.path.join(local, "sub"))
        with open(os.path.join(local, "sub", "a.bin"), "wb") as f:
            f.write(b"\x00\x01")
    assert _object(fake_gcs, f"{WORKDIR}/export/step_000002/config.json") == b"{}"
    assert _object(fake_gcs, f"{WORKDIR}/export/step_000002/sub/a.bin") == b"\x00\x01"
    with pytest.raises(RuntimeError), paths.staging_dir(f"{WORKDIR}/export/failed") as local:
        with open(os.path.join(local, "config.json"), "w") as f:
            f.write("{}")
        raise RuntimeError("export failed")
    assert not fake_gcs.exists(f"{WORKDIR}/export/failed/config.json")


def test_staging_dir_is_the_folder_itself_when_local(tmp_path):
    with paths.staging_dir(tmp_path / "out") as local:
        assert local == str(tmp_path / "out")


def test_checkpoint_manager_keeps_the_uri(fake_gcs, monkeypatch):
    import orbax.checkpoint as ocp

    made = []
    monkeypatch.setattr(ocp, "CheckpointManager", lambda directory, **_: made.append(directory))
    checkpoint.checkpoint_manager(WORKDIR + "/")
    checkpoint.checkpoint_manager("runs/cpu")
    assert made == [f"{WORKDIR}/checkpoints", os.path.abspath("runs/cpu/checkpoints")]


def test_missing_backend_package_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _refuse_uris(monkeypatch)
    monkeypatch.setenv("EPATH_USE_TF", "0")
    monkeypatch.delitem(REGISTRY._registry, "gcs", raising=False)
    missing = {"class": "lsp_jax_test_no_such_module.GCSFileSystem", "err": "missing"}
    monkeypatch.setitem(REGISTRY.known_implementations, "gcs", missing)
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # None: import fails.
    needs_both = (
        "needs the packages gcsfs and google-cloud-storage: pip install gcsfs google-cloud-storage"
    )
    for call in (
        lambda: MetricsWriter(WORKDIR),
        lambda: checkpoint.write_run_info(WORKDIR, INFO),
        lambda: checkpoint.checkpoint_manager(WORKDIR),
        lambda: paths.makedirs(WORKDIR),
    ):
        with pytest.raises(UserError, match=needs_both):
            call()
    monkeypatch.setitem(sys.modules, "google.cloud.storage", types.ModuleType("storage"))
    with pytest.raises(UserError, match="needs the package gcsfs: pip install gcsfs$"):
        paths.check_backend("gs://bucket/run")
    with pytest.raises(UserError, match="unsupported storage scheme ftp://"):
        paths.makedirs("ftp://host/run")
    paths.check_backend("runs/cpu")  # Local paths need nothing.
    assert os.listdir(tmp_path) == []
