"""Preemption on two hosts, and saves written in the background (tests/train_process.py).

Every run here is a subprocess of the same script, so that runs compared bitwise share
their numerics settings (the pytest process sets its own matmul precision).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lsp_jax.weights import sources, tiny
from tests.conftest import subprocess_xla_flags

SCRIPT = Path(__file__).resolve().parent / "train_process.py"


def _env(devices=1):
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(devices), JAX_PLATFORMS="cpu")
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    return env


def _start(workdir, *args, devices=1):
    tiny.tiny_model_path("tiny-random"), tiny.tiny_model_path("tiny-random-rm")  # Once.
    command = [sys.executable, str(SCRIPT), str(workdir), *args]
    return subprocess.Popen(
        command, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


# Data parallel: CPU collectives between processes (gloo) are set up on first use,
# ~35 s for the many all-gathers of the default FSDP mesh, under 1 s for these.
DATA_PARALLEL = "--config.mesh.shape=(2,1,1)"


def _pair(workdir, *args):
    """Two processes joined by jax.distributed: two fake hosts of one run."""
    port = str(_free_port())
    args = (DATA_PARALLEL, *args)
    return [_start(workdir, "--process", str(i), "--port", port, *args) for i in range(2)]


def _finish(procs, timeout=600):
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outputs


def _logged_steps(workdir) -> list[int]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _wait(condition, procs, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                others = [q for q in procs if q is not p]
                _finish(others, timeout=1)
                raise AssertionError(f"exited before {what}:\n{p.stdout.read()[-5000:]}")
        if time.time() > deadline:
            _finish(procs, timeout=1)
            raise AssertionError(f"no {what} in {timeout} s")
        time.sleep(0.05)


def _checkpoint_steps(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _assert_same_params(a, b):
    x, y = sources.load_model(str(a))[1], sources.load_model(str(b))[1]
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_sigterm_to_one_of_two_hosts_stops_both_at_the_same_iteration(tmp_path):
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    many = ("--config.train.num_steps=400", "--config.train.checkpoint_every=0")
    procs = _pair(cut, *many)
    _wait(lambda: len(_logged_steps(cut)) >= 2, procs, "second iteration")
    procs[1].send_signal(signal.SIGTERM)  # The host that does not write logs.
    codes, outputs = _finish(procs, timeout=300)
    assert codes == [143, 143], outputs[0][-3000:] + outputs[1][-3000:]
    # One checkpoint, written by both hosts together, at the iteration the lead logged.
    (stopped,) = _checkpoint_steps(cut)
    assert 2 <= stopped < 400
    assert f"Stopped by SIGTERM at iteration {stopped};" in outputs[0]
    assert max(_logged_steps(cut)) == stopped
    target = f"--config.train.num_steps={stopped + 2}"
    codes, outputs = _finish(_pair(cut, target))
    assert codes == [0, 0], outputs[0][-3000:]
    assert f"Resumed from {cut} at iteration {stopped}." in outputs[0]
    # The uninterrupted run: the same two-device program in one process (measured: bitwise
    # the pair's), which compiles once and then reads the compile cache; a pair's process
    # 1 compiles on every launch (JAX writes the cache from process 0 only, and its key
    # holds each process's own view of the topology).
    codes, outputs = _finish([_start(whole, DATA_PARALLEL, target, devices=2)])
    assert codes == [0], outputs[0][-3000:]
    _assert_same_params(cut, whole)


def test_training_goes_on_during_a_save_and_a_kill_mid_save_keeps_the_previous(tmp_path):
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    steps = ("--config.train.num_steps=8", "--config.train.checkpoint_every=2")
    steps += ("--config.train.save_in_background=True",)  # Not the default on CPU.
    proc = _start(cut, "--hang-save", "4", *steps)  # Checkpoint 4 is never completed.
    try:
        # Iterations 5 and 6 run while checkpoint 4 is being written (a blocking save
        # would hold the loop at iteration 4); the save of 6 then waits for it.
        saving = cut / "saving_4"  # Touched once the files of 4 are written, before commit.
        _wait(lambda: 6 in _logged_steps(cut) and saving.exists(), [proc], "iteration 6")
        assert _checkpoint_steps(cut) == [2]
    finally:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _checkpoint_steps(cut) == [2]  # The half-written 4 is not a checkpoint.
    codes, outputs = _finish([_start(cut, *steps)])
    assert codes == [0], outputs[0][-3000:]
    assert f"Resumed from {cut} at iteration 2." in outputs[0]
    codes, outputs = _finish([_start(whole, *steps)])
    assert codes == [0], outputs[0][-3000:]
    _assert_same_params(cut, whole)
    assert _checkpoint_steps(cut) == _checkpoint_steps(whole) == [4, 6, 8]
