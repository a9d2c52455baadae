"""`lsp-jax plot` and the training export on a gs:// workdir (the fake in-memory store of
test_paths: no append, no rename, as on Cloud Storage)."""

import json
import os

from test_paths import WORKDIR, _object, fake_gcs  # noqa: F401

from lsp_jax.commands import plot
from lsp_jax.runtime import paths
from lsp_jax.weights import sources
from lsp_jax.weights.export import export_folder


def test_plot_reads_and_writes_gs(fake_gcs):  # noqa: F811
    rows = [{"step": 1, "reward/solver": 0.5, "kl/x": 1.0}, {"step": 2, "reward/solver": 0.7}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    fake_gcs.pipe_file(f"{WORKDIR}/metrics.jsonl", text.encode())
    written = plot.plot_metrics(WORKDIR)
    assert written == [f"{WORKDIR}/plots/kl.png", f"{WORKDIR}/plots/reward.png"]
    for path in written:
        assert _object(fake_gcs, path)[:8] == b"\x89PNG\r\n\x1a\n"
    expected = {"reward/solver": {1: 0.5, 2: 0.7}, "kl/x": {1: 1.0}}
    assert plot.read_metrics(f"{WORKDIR}/metrics.jsonl") == expected


def test_export_to_gs_equals_a_local_export(fake_gcs, tmp_path):  # noqa: F811
    config, params = sources.load_model("tiny-random")
    local = tmp_path / "step"
    export_folder("tiny-random", str(local), config, params)
    dest = f"{WORKDIR}/export/step_000001"
    with paths.staging_dir(dest) as staged:
        export_folder("tiny-random", staged, config, params)
    names = sorted(os.path.basename(p) for p in fake_gcs.ls(dest, detail=False))
    assert names == sorted(os.listdir(local))
    for name in names:
        assert _object(fake_gcs, f"{dest}/{name}") == (local / name).read_bytes()
