"""The training loop on configs/tiny.py: one program, resume, preemption, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lsp_jax import cli
from lsp_jax.train import config as config_lib
from lsp_jax.train import loop
from lsp_jax.train import run as run_lib
from lsp_jax.train.optim import make_optimizer
from lsp_jax.weights import sources

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")


def tiny_config(**overrides):
    config = config_lib.load_config(TINY)
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config


def final_params(workdir):
    return sources.load_model(str(workdir))[1]


def test_one_program_traced_and_compiled_once(tmp_path, monkeypatch):
    traces, compiles = [], []
    from lsp_jax.train import placement

    real_step, real_compile = placement.lsp_step, loop.compile_step

    def counting_step(*args, **kwargs):
        traces.append(1)
        return real_step(*args, **kwargs)

    def counting_compile(*args, **kwargs):
        compiles.append(1)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(placement, "lsp_step", counting_step)
    monkeypatch.setattr(loop, "compile_step", counting_compile)
    assert loop.train(tiny_config(), str(tmp_path), log=lambda *_: None) == 0
    assert (len(traces), len(compiles)) == (1, 1)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # Three iterations ran through that one program.


def _primitive_counts(jaxpr, counts=None):
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            _primitive_counts(sub, counts)
    return counts


def test_jaxpr_of_one_iteration_holds_both_rollouts_and_the_update():
    import functools

    from lsp_jax.train import placement
    from lsp_jax.train.state import init_state

    run = run_lib.build_run(tiny_config())
    state = init_state(run.params, run.optimizer, 0)
    fn = functools.partial(
        placement.run_iterations, cfg=run.step_cfg, optimizer=run.optimizer, num_iterations=1
    )
    closed = jax.make_jaxpr(fn)(state, run.frozen)
    counts = _primitive_counts(closed.jaxpr)
    # Two sampler decode loops (Challenger, Solver) and the iteration scan.
    assert counts.get("while", 0) >= 2, counts
    assert counts.get("scan", 0) >= 1
    # Adam's update divides by sqrt(v); the gradient is in the same program.
    assert counts.get("sqrt", 0) >= 1
    out_state = jax.eval_shape(fn, state, run.frozen)[0]
    assert jax.tree.structure(out_state.opt_state) == jax.tree.structure(state.opt_state)


def test_resume_gives_bitwise_the_uninterrupted_run(tmp_path):
    quiet = dict(log=lambda *_: None)
    split, whole = tmp_path / "split", tmp_path / "whole"
    assert loop.train(tiny_config(**{"train.num_steps": 3}), str(split), **quiet) == 0
    assert loop.train(tiny_config(**{"train.num_steps": 6}), str(split), **quiet) == 0
    assert loop.train(tiny_config(**{"train.num_steps": 6}), str(whole), **quiet) == 0
    a, b = final_params(split), final_params(whole)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = [int(p.name) for p in (split / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) == 6


def test_phase_split_and_periodic_eval_are_logged(tmp_path):
    import json

    config = tiny_config(
        **{
            "train.num_steps": 2,
            "train.phase_times_every": 2,
            "eval.every": 2,
            "eval.num_prompts": 2,
            "eval.max_new_tokens": 3,
        }
    )
    lines = []
    assert loop.train(config, str(tmp_path), log=lines.append) == 0
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith(("time/phase/", "eval/")) for k in rows[0])
    phases = ("challenger", "solver", "rewards", "reference", "update")
    seconds = [rows[1][f"time/phase/{p}_s"] for p in phases]
    fractions = [rows[1][f"time/phase/{p}_frac"] for p in phases]
    assert all(s > 0 for s in seconds)
    np.testing.assert_allclose(fractions, np.array(seconds) / sum(seconds), rtol=1e-6)
    assert 0.0 <= rows[1]["eval/win_rate"] <= 100.0
    assert rows[1]["eval/avg_length_policy"] > 0


def test_eval_slice_is_held_out_of_grpo_training():
    held = run_lib.eval_indices(260, 16)
    assert len(set(held)) == 16 and held[0] == 0 and held[-1] < 260
    config = tiny_config(**{"game.mode": "grpo", "eval.every": 5, "eval.num_prompts": 16})
    chat = sources.load_chat_template(config.model.source)
    tokens, lengths = run_lib.grpo_prompts(config, chat, 32)
    assert len(lengths) == 260 - 16
    eval_first = chat.tokenizer.encode(run_lib.eval_prompts(config)[0].text)[:32]
    rows = [list(tokens[i, : lengths[i]]) for i in range(len(lengths))]
    assert eval_first not in rows


def _spawn(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["LSP_JAX_COMPILATION_CACHE"] = jax.config.jax_compilation_cache_dir or "0"
    command = [
        sys.executable,
        "-m",
        "lsp_jax.cli",
        "train",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        *extra,
    ]
    return subprocess.Popen(
        command, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


def test_sigkill_after_a_checkpoint_resumes_and_finishes(tmp_path):
    many = "--config.train.num_steps=400"
    proc = _spawn(tmp_path, many)
    _wait_for(tmp_path / "checkpoints" / "2", proc)
    # A second trainer on the same workdir is refused while the first one runs.
    second = _spawn(tmp_path, many)
    try:
        output, _ = second.communicate(timeout=120)
    finally:
        second.kill()
    assert second.returncode == 2, output
    assert "Another trainer is running" in output and f"pid {proc.pid} " in output, output
    assert "Traceback" not in output
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # The lock died with its holder: the resumed run starts, and logs each iteration once
    # (the killed run may have logged iterations after its last checkpoint).
    target = max(_checkpoint_steps(tmp_path)) + 3
    done = _spawn(tmp_path, f"--config.train.num_steps={target}")
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output
    assert "Resumed from" in output and f"Done: {target} iterations" in output
    import json

    for name in ("metrics.jsonl", "samples.jsonl"):
        steps = [json.loads(r)["step"] for r in (tmp_path / name).read_text().splitlines()]
        assert steps == list(range(1, target + 1)), (name, steps)


def test_sigterm_saves_a_checkpoint_at_the_current_iteration(tmp_path):
    proc = _spawn(tmp_path, "--config.train.num_steps=400", "--config.train.checkpoint_every=50")
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(metrics, proc)
    while not metrics.read_text().strip():  # The loop is running once step 1 is logged.
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    last = int(output.rsplit("Stopped by SIGTERM at iteration ", 1)[1].split(";")[0])
    assert 0 < last < 400
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) == last


def _fail(capsys, *overrides):
    import tempfile

    # A fresh workdir outside the checkout: the run may take its lock before failing.
    workdir = os.path.join(tempfile.mkdtemp(), "unused")
    code = cli.main(["train", "--config", TINY, "--workdir", workdir, *overrides])
    return code, capsys.readouterr().err


def test_bad_input_gives_one_clear_error(capsys, tmp_path):
    code, err = _fail(capsys, "--config.game.answer_per_query=3")
    assert code == 2 and "game.answer_per_query" in err and "answers_per_query" in err
    code, err = _fail(capsys, "--config.game.answers_per_query=1")
    assert code == 2 and "answers_per_query" in err
    code, err = _fail(capsys, f"--config.model.source={tmp_path / 'nowhere'}")
    assert code == 2 and "nowhere" in err and "does not exist" in err
    assert "Traceback" not in err


def test_reward_model_with_another_vocabulary_is_refused(tmp_path, capsys):
    import json
    import shutil

    from tokenizers import Tokenizer, models

    rm = Path(sources.resolve("tiny-random-rm").path)
    other = tmp_path / "other_rm"
    shutil.copytree(rm, other)
    vocab = {f"w{i}": i for i in range(300)} | {"<|im_start|>": 300, "<|im_end|>": 301}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(other / "tokenizer.json"))
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    code, err = _fail(capsys, f"--config.reward.model={other}")
    assert code == 2 and "another tokenizer" in err and str(other) in err


def test_nonfinite_gradient_is_skipped_in_graph_and_counted():
    import optax

    from lsp_jax.train.optim import consecutive_skips, skip_metrics, skip_nonfinite

    optimizer = skip_nonfinite(optax.adam(0.1))
    params = {"w": np.ones(3, np.float32)}
    state = optimizer.init(params)
    step = jax.jit(lambda g, s, p: optimizer.update(g, s, p))
    for bad in (np.nan, np.inf):
        updates, new_state = step({"w": np.array([1.0, bad, 1.0], np.float32)}, state, params)
        np.testing.assert_array_equal(updates["w"], 0.0)  # Nothing reaches the parameters,
        for a, b in zip(jax.tree.leaves(new_state.inner), jax.tree.leaves(state.inner)):
            np.testing.assert_array_equal(a, b)  # nor Adam's moments or step count.
        state = new_state
    assert consecutive_skips(state) == 2 and int(state.total) == 2
    assert float(skip_metrics(state)["optim/skipped"]) == 1.0
    # A finite gradient whose update would overflow the parameters is skipped too.
    huge = {"w": np.full(3, 3e38, np.float32)}
    updates, state = jax.jit(lambda g, s, p: skip_nonfinite(optax.sgd(-1.0)).update(g, s, p))(
        huge, skip_nonfinite(optax.sgd(-1.0)).init(huge), huge
    )
    assert consecutive_skips(state) == 1 and not np.any(updates["w"])
    state = optimizer.init(params)
    updates, state = step({"w": np.ones(3, np.float32)}, state, params)
    assert consecutive_skips(state) == 0 and np.all(np.asarray(updates["w"]) != 0)


def test_diverging_run_stops_with_an_error_and_saves_nothing_non_finite(tmp_path, capsys):
    import json

    args = ["train", "--config", TINY, "--workdir", str(tmp_path)]
    code = cli.main([*args, "--config.optim.lr=1e9", "--config.train.num_steps=8"])
    err = capsys.readouterr().err
    assert code == 1 and "diverged" in err and "max_nonfinite_steps=3" in err, err
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) < 8 and rows[-1]["optim/skipped_consecutive"] == 3
    assert any(isinstance(v, float) and np.isnan(v) for v in rows[-1].values())  # Not null.
    assert not (tmp_path / "export").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert steps and max(steps) <= len(rows) - 3  # None written during the skipped streak.
    params = final_params(tmp_path)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    import shutil

    first = tmp_path / "truncated"
    assert loop.train(tiny_config(), str(first), log=lambda *_: None) == 0
    assert _checkpoint_steps(first) == [1, 2, 3]
    second = tmp_path / "no_metadata"
    shutil.copytree(first, second)
    data = [p for p in (first / "checkpoints" / "3").rglob("*") if p.is_file()]
    for path in data:  # Every file cut in half, as by a full disk or a killed copy.
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (second / "checkpoints" / "3" / "default" / "_METADATA").unlink()
    for workdir in (first, second):
        lines = []
        config = tiny_config(**{"train.num_steps": 4})
        assert loop.train(config, str(workdir), log=lines.append) == 0
        damaged = [line for line in lines if "is damaged" in line]
        assert len(damaged) == 1 and str(workdir / "checkpoints" / "3") in damaged[0], lines
        assert "resumed from step 2" in damaged[0]
        assert "Resumed from" in "\n".join(lines) and "iteration 2." in "\n".join(lines)
        assert _checkpoint_steps(workdir)[-1] == 4
        assert (workdir / "checkpoints" / "3.damaged").is_dir()  # Kept for inspection.


def test_resume_rewrites_no_iteration_twice_in_the_logs(tmp_path):
    import json
    import shutil

    assert loop.train(tiny_config(), str(tmp_path), log=lambda *_: None) == 0
    # As after a kill -9 once iteration 3 was logged but before its checkpoint (and a
    # line cut off in the middle of a write).
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss/tot')
    assert loop.train(tiny_config(), str(tmp_path), log=lambda *_: None) == 0
    for name in ("metrics.jsonl", "samples.jsonl"):
        steps = [json.loads(r)["step"] for r in (tmp_path / name).read_text().splitlines()]
        assert steps == sorted(steps) and sorted(set(steps)) == [1, 2, 3], (name, steps)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(0.0 < row["judge/digit_mass"] <= 1.0 for row in rows)  # Logged every iteration.


def test_workdir_problems_give_one_clear_error(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = _fail_in(capsys, blocker / "run")
    assert code == 2 and "a file is in the way" in err and "Traceback" not in err
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # Running as root, which ignores permissions.

        def refuse(path):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(loop.paths, "makedirs", refuse)
    try:
        code, err = _fail_in(capsys, read_only)
        assert code == 2 and "not writable" in err and "Traceback" not in err
    finally:
        read_only.chmod(0o755)


def _fail_in(capsys, workdir):
    code = cli.main(["train", "--config", TINY, "--workdir", str(workdir)])
    return code, capsys.readouterr().err


def test_end_of_turn_always_stops_both_roles(tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(sources.resolve("tiny-random").path, folder)
    # Files that name only the end-of-text token as a stop (as Llama-3.2's base files do).
    for name in ("config.json", "generation_config.json"):
        hf_config = json.loads((folder / name).read_text())
        hf_config["eos_token_id"] = 256
        (folder / name).write_text(json.dumps(hf_config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    chat = sources.load_chat_template(str(folder))
    assert 258 not in chat.tokenizer.stop_ids and chat.end_of_turn_id == 258  # <|im_end|>
    run = run_lib.build_run(tiny_config(**{"model.source": str(folder)}))
    for role in (run.step_cfg.challenger, run.step_cfg.solver):
        assert 258 in role.stop_tokens and 256 in role.stop_tokens


def _size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def test_default_cpu_run_keeps_a_proportionate_workdir(tmp_path):
    """The README's main job, scaled down to the tiny model: its train settings leave one
    checkpoint (parameters + Adam's two moments) and one export, not several copies."""
    cpu = config_lib.load_config(str(ROOT / "configs" / "smollm2_cpu.py")).train
    keys = ("num_steps", "checkpoint_every", "keep_checkpoints", "export_every")
    config = tiny_config(**{f"train.{k}": cpu[k] for k in keys})
    assert loop.train(config, str(tmp_path), log=lambda *_: None) == 0
    params = final_params(tmp_path)
    model_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    checkpoints = _size(tmp_path / "checkpoints")
    assert checkpoints < 3.5 * model_bytes, (checkpoints, model_bytes)  # One: θ, m, v.
    assert _size(tmp_path / "export") < 1.5 * model_bytes


def _safetensors_dtypes(path) -> set:
    import json
    import struct

    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_bfloat16_export_and_first_moment(tmp_path):
    import jax.numpy as jnp
    import optax

    overrides = {"train.num_steps": 1, "train.export_dtype": "bfloat16"}
    overrides["optim.mu_dtype"] = "bfloat16"
    assert loop.train(tiny_config(**overrides), str(tmp_path), log=lambda *_: None) == 0
    export = tmp_path / "export" / "step_000001"
    assert _safetensors_dtypes(export / "model.safetensors") == {"BF16"}
    exported, trained = sources.load_model(str(export))[1], final_params(tmp_path)
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(trained), strict=True):
        expected = np.asarray(jnp.asarray(y).astype(jnp.bfloat16).astype(x.dtype))
        np.testing.assert_array_equal(np.asarray(x), expected)
    optimizer = make_optimizer(tiny_config(**overrides).optim, 1)
    (adam,) = [
        s
        for s in jax.tree.leaves(
            optimizer.init({"w": jnp.ones(3)}), is_leaf=lambda s: hasattr(s, "mu")
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32


def test_bad_export_and_moment_dtypes_are_refused(capsys):
    code, err = _fail(capsys, "--config.train.export_dtype=float8")
    assert code == 2 and "train.export_dtype='float8'" in err and "bfloat16" in err
    code, err = _fail(capsys, "--config.optim.mu_dtype=int8")
    assert code == 2 and "optim.mu_dtype='int8'" in err


def test_wandb_offline_logs_every_row_to_one_run_across_a_resume(tmp_path, monkeypatch):
    import json

    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kwargs):
        logged.append((self.id, step, data["reward/solver"]))
        return log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    for steps in (2, 3):  # The second run resumes the first.
        overrides = {"train.num_steps": steps, "train.wandb_project": "lsp-jax-test"}
        assert loop.train(tiny_config(**overrides), str(tmp_path), log=lambda *_: None) == 0
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [(run_id, row["step"], row["reward/solver"]) for row in rows]
    assert [row["step"] for row in rows] == [1, 2, 3]
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and all((run / f"run-{run_id}.wandb").is_file() for run in runs)


def test_wandb_project_without_wandb_installed_is_refused(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError.
    code, err = _fail(capsys, "--config.train.wandb_project=p")
    assert code == 2 and "pip install wandb" in err and "Traceback" not in err


def test_saves_are_in_the_background_on_accelerators_only_by_default():
    assert jax.default_backend() == "cpu"
    assert loop.save_in_background(None) is False  # The live state's memory (see there).
    assert loop.save_in_background(True) is True and loop.save_in_background(False) is False
