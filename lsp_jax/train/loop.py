"""The host loop: build the run, resume, call the compiled step, log, save, export."""

import contextlib
import ctypes
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lsp_jax.errors import UserError
from lsp_jax.model import lora
from lsp_jax.runtime import checkpoint, paths, sharding
from lsp_jax.runtime import metrics as metrics_lib
from lsp_jax.train import lock as lock_lib
from lsp_jax.train import phases, preemption, reward_check_report
from lsp_jax.train import placement as placement_lib
from lsp_jax.train.optim import consecutive_skips
from lsp_jax.train.run import Run, build_run, eval_prompts, lora_info, make_mesh, mesh_rules
from lsp_jax.train.state import policy_params, reference_params
from lsp_jax.weights import sources

SUMMARY_KEYS = (
    "reward/solver",
    "quality/solver",
    "reward/challenger",
    "kl/solver",
    "length/query",
    "length/answer",
    "time/step_s",
)


def run_eval(config, run: Run, state, step: int, log) -> dict:
    """Win rate of the current policy against the reference on the held-out slice,
    judged pairwise by the reference (both orders); metrics under 'eval/'."""
    from lsp_jax.eval import evaluate, winrate

    if jax.process_count() > 1:
        log("eval.every: skipped, periodic evaluation runs on single-host runs only.")
        return {}
    start = time.perf_counter()
    chat = sources.load_chat_template(run.source)
    summary = evaluate.evaluate_policy(
        run.step_cfg.policy,
        policy_params(run.frozen, state.params),
        reference_params(run.frozen),
        chat,
        eval_prompts(config),
        max_new_tokens=config.eval.max_new_tokens,
        seed=step,
        reference_config=lora.base_config(run.step_cfg.policy),
    )
    overall = summary[winrate.OVERALL]
    low, high = overall["win_rate_ci"]
    log(
        f"  eval at iteration {step}: win rate vs reference {overall['win_rate']:.1f}% "
        f"[{low:.1f}, {high:.1f}] on {overall['n']} held-out prompts "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return {
        "eval/win_rate": overall["win_rate"],
        "eval/lc_win_rate": overall["lc_win_rate"],
        "eval/avg_length_policy": overall["avg_length_model"],
        "eval/avg_length_reference": overall["avg_length_baseline"],
        "eval/seconds": time.perf_counter() - start,
    }


def compile_step(run: Run, placement, state, num_iterations: int):
    """(compiled iteration, seconds): `num_iterations` iterations per call."""
    return placement_lib.compile_iterations(
        run.step_cfg, run.optimizer, placement, state, run.frozen, num_iterations
    )


def save_in_background(choice) -> bool:
    """train.save_in_background; None: on accelerators (TPU, GPU), not on CPU. There the
    host copy orbax writes from is the live state's own memory, so the next iteration
    cannot reuse (donate) it and holds a second copy of the state until the save ends:
    +2 GB resident for the CPU default, and memory is what a laptop lacks."""
    if choice is None:
        return jax.default_backend() != "cpu"
    return bool(choice)


def _due(every: int, step: int, k: int) -> bool:
    """Whether a multiple of `every` lies in the k iterations ending at `step`."""
    return bool(every) and step // every > (step - k) // every


def train(config, workdir: str, *, log=print) -> int:
    """Trains until config.train.num_steps iterations; resumes from WORKDIR if it holds
    a checkpoint. Returns a process exit code (143 when stopped by a preemption notice,
    SIGTERM, on any host; 1 when the run diverged: train.max_nonfinite_steps updates in
    a row were skipped)."""
    check_workdir(workdir)  # A gs:// workdir: checks gcsfs is installed, before any work.
    sharding.maybe_initialize_distributed()  # Before watching: JAX then owns SIGTERM.
    # Watched from here, so that a preemption while loading or compiling also ends cleanly.
    with preemption.watch() as stop:
        return _train(config, workdir, stop, log)


def check_workdir(workdir: str) -> None:
    """Creates WORKDIR, or raises UserError when it cannot be a run folder (a path under
    a file, no permission to write)."""
    try:
        paths.makedirs(workdir)
        if not paths.is_remote(workdir):
            probe = os.path.join(workdir, f".write_test_{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
    except (FileExistsError, NotADirectoryError):
        raise UserError(
            f"--workdir {workdir}: a file is in the way (the path or one of its parents is "
            "a file, not a folder). Pass a folder path for --workdir."
        ) from None
    except PermissionError:
        raise UserError(
            f"--workdir {workdir} is not writable (permission denied). Pass a folder you "
            "can write to, or fix its permissions."
        ) from None
    except OSError as error:
        raise UserError(f"--workdir {workdir} cannot be used: {error.strerror}.") from None


def _train(config, workdir, stop, log):
    mesh = make_mesh(config)
    lead = jax.process_index() == 0  # On a pod, one host writes logs and exports.
    # The lead host holds the workdir for the whole run (checked before loading models).
    with lock_lib.WorkdirLock(workdir) if lead else contextlib.nullcontext():
        return _train_locked(config, workdir, mesh, lead, stop, log)


def _train_locked(config, workdir, mesh, lead, stop, log):
    t = config.train
    run = build_run(config, mesh)
    policy = run.step_cfg.policy
    if not lead:
        log = lambda *_: None
    run_config = json.loads(config.to_json_best_effort())
    if lead:
        info = {
            "model_source": run.source,
            "model_config": policy.to_hf_config(),
            "scan_layers": policy.scan_layers,
            "lora": lora_info(policy.lora),
            "config": run_config,
        }
        checkpoint.write_run_info(workdir, info)
    placement = placement_lib.plan(
        run.step_cfg, run.optimizer, run.frozen, mesh, mesh_rules(config)
    )
    run.frozen = placement_lib.place_frozen(run.frozen, placement)
    background = save_in_background(t.get("save_in_background"))
    manager = checkpoint.checkpoint_manager(workdir, keep=t.keep_checkpoints, background=background)
    if config.reward.check_before_train and manager.latest_step() is None:
        reward_check_report.before_train(config, run, log)
    state = placement_lib.place_state(run.params, run.optimizer, t.seed, placement)
    run.params = None  # Host copy no longer needed.
    if manager.latest_step() is not None:
        state, manager = checkpoint.restore_newest_intact(
            workdir, manager, state, keep=t.keep_checkpoints, log=log, background=background
        )
        log(f"Resumed from {workdir} at iteration {int(state.step)}.")
    # Lines logged after the restored checkpoint (before a crash) are written again.
    resume_step = int(state.step)
    writer = (
        metrics_lib.MetricsWriter(
            workdir,
            resume_step=resume_step,
            wandb_project=t.wandb_project,
            run_config=run_config,
        )
        if lead
        else metrics_lib.NullWriter()
    )
    try:
        return _loop(config, workdir, run, placement, state, manager, writer, stop, log)
    finally:
        checkpoint.finish(manager)  # A save still being written completes before exit.
        writer.close()


def _loop(config, workdir, run, placement, state, manager, writer, stop, log):
    t = config.train
    step = int(state.step)
    compiled = {}
    timer = None  # PhaseTimer, made when first needed.
    parse_warning = _ParseFailureWarning(config.reward)
    progress = tqdm(
        disable=None if jax.process_index() == 0 else True,
        total=t.num_steps,
        initial=step,
        desc="self-play",
        unit="it",
        dynamic_ncols=True,
    )
    while step < t.num_steps and not stop.reached():
        k = min(t.steps_per_jit, t.num_steps - step)
        if k not in compiled:
            compiled[k] = _timed_compile(run, placement, state, k, log)
        start = time.perf_counter()
        state, metrics, rollout = compiled[k](state, run.frozen)
        metrics, rollout = jax.device_get((metrics, rollout))
        elapsed = time.perf_counter() - start
        phase_times = {}
        if _due(t.phase_times_every, step + k, k):
            timer = timer or phases.PhaseTimer(run.step_cfg, run.optimizer, placement)
            phase_times = timer(state, run.frozen)
            progress.write(phases.summary(phase_times, elapsed / k))
        for i in range(k):
            step += 1
            row = {key: value[i] for key, value in metrics.items()}
            row["time/step_s"] = elapsed / k
            row["throughput/tokens_per_s"] = row["tokens/generated"] / (elapsed / k)
            if i == k - 1:
                row.update(phase_times)
                if _due(config.eval.every, step, k):
                    row.update(run_eval(config, run, state, step, progress.write))
            parse_warning.check(step, row, progress.write)
            if step % t.log_every == 0 or step == t.num_steps:
                writer.write_metrics(step, row)
                progress.write(metrics_lib.summary_line(step, row, SUMMARY_KEYS))
        samples = decode_samples(run.tokenizer, rollout, t.samples_to_log)
        writer.write_samples(step, samples)
        if samples and step % t.log_every == 0:
            progress.write(_sample_text(samples[0]))
        progress.update(k)
        skipped = consecutive_skips(state.opt_state)
        if skipped >= t.max_nonfinite_steps:
            progress.close()
            return _diverged(manager, step, skipped, t.max_nonfinite_steps)
        if skipped:
            # The parameters did not change: a checkpoint would only push out older ones.
            continue
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            _save(manager, step, state)
        if t.export_every and step % t.export_every == 0:
            export(workdir, run, state.params, step, log)
    progress.close()
    if manager.latest_step() != step:
        _save(manager, step, state)
    if stop.stopped:
        checkpoint.finish(manager)
        log(f"Stopped by SIGTERM at iteration {step}; checkpoint saved. Rerun to resume.")
        return 143
    path = export(workdir, run, state.params, step, log)
    log(f"Done: {step} iterations. Hugging Face export: {path}")
    return 0


class _ParseFailureWarning:
    """Warns when too many sampled judgements have no readable score: each such answer
    silently gets reward.judge_fallback. At most once per WARN_EVERY iterations."""

    WARN_EVERY = 100

    def __init__(self, reward_config):
        self.threshold = reward_config.judge_parse_failure_warn
        self.fallback = reward_config.judge_fallback
        self.last = None

    def check(self, step: int, row: dict, write) -> None:
        rate = row.get("judge/parse_failure_rate")
        if rate is None or not rate > self.threshold:
            return
        if self.last is not None and step - self.last < self.WARN_EVERY:
            return
        self.last = step
        write(
            f"Warning: at iteration {step}, {float(rate):.0%} of the sampled judgements had "
            f"no readable <Score> (over reward.judge_parse_failure_warn={self.threshold}); "
            f"they scored reward.judge_fallback={self.fallback}. Check the judge's samples, "
            "lower reward.judge_temperature, raise reward.judge_max_tokens, or use "
            "reward.judge_mode=expected."
        )


def _save(manager, step: int, state) -> None:
    """A checkpoint of `state`, never of non-finite parameters (which the skip guard
    keeps out of the update, but a source can hold)."""
    if not all_finite(state.params):
        raise UserError(
            f"The parameters at iteration {step} are not finite (NaN or inf); no checkpoint "
            "is written. Check the model source's weights."
        )
    checkpoint.save(manager, step, state)


def all_finite(tree) -> bool:
    finite = jax.jit(lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in t])))
    return bool(finite(jax.tree.leaves(tree)))


def _diverged(manager, step: int, skipped: int, limit: int) -> int:
    latest = manager.latest_step()
    kept = f"the newest checkpoint is iteration {latest}" if latest else "no checkpoint exists"
    print(
        f"lsp-jax train: error: the run diverged: the last {skipped} iterations (up to "
        f"{step}) had a non-finite loss or gradient, and their updates were skipped "
        f"(train.max_nonfinite_steps={limit}). Nothing after iteration {step - skipped} was "
        f"saved or exported; {kept}. Fix: lower optim.lr or optim.clip, or check the "
        "rewards (metrics.jsonl shows NaN and Infinity as such).",
        file=sys.stderr,
    )
    return 1


def _timed_compile(run, placement, state, k, log):
    log(f"Compiling the self-play iteration ({k} per call)...")
    compiled, seconds = compile_step(run, placement, state, k)
    log(f"Compiled in {seconds:.1f} s.{_memory_summary(compiled)}")
    release_freed_memory()
    return compiled


def release_freed_memory() -> None:
    """Hands the heap memory that XLA's compiler used and freed back to the system (glibc
    keeps it otherwise: ~0.7 GB of resident memory after compiling the CPU default)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to do.
        pass


def _memory_summary(compiled) -> str:
    """' Per device: ... arguments, ... temporaries (XLA).' when XLA reports it."""
    try:
        m = compiled.memory_analysis()
        args, temps = m.argument_size_in_bytes, m.temp_size_in_bytes
    except Exception:  # Not every backend implements memory_analysis.
        return ""
    gib = 2**30
    return f" Per device: {args / gib:.2f} GiB arguments, {temps / gib:.2f} GiB temporaries (XLA)."


def export(workdir, run: Run, params, step: int, log) -> str:
    """Writes export/step_N: the policy as a Hugging Face folder (with LoRA, the adapters
    merged into the base: W + (alpha/rank) A B) and, for LoRA runs with
    train.export_adapter, the adapters alone in PEFT's layout under adapter/."""
    from jax.experimental import multihost_utils

    from lsp_jax.weights.export import export_folder
    from lsp_jax.weights.peft import save_peft_adapter

    path = paths.join(workdir, "export", f"step_{step:06d}")
    if not all_finite(params):
        raise UserError(f"The parameters at iteration {step} are not finite; nothing exported.")
    # Every host takes part in gathering the sharded parameters; the first one writes.
    params = multihost_utils.process_allgather(params, tiled=True)
    config, adapters = run.step_cfg.policy, None
    if config.lora.rank:
        adapters = params
        base = multihost_utils.process_allgather(run.frozen.base_params, tiled=True)
        config, params = lora.merge(config, lora.combine(base, adapters))
    if jax.process_index() == 0:
        with paths.staging_dir(path) as local:  # Written locally, then uploaded if remote.
            export_folder(run.source, local, config, params, dtype=run.export_dtype)
            if adapters is not None and run.export_adapter:
                adapter_path = os.path.join(local, "adapter")
                save_peft_adapter(
                    adapter_path,
                    run.step_cfg.policy,
                    adapters,
                    base=run.source,
                    dtype=run.export_dtype,
                )
        log(f"Exported Hugging Face folder: {path}")
    return path


def decode_samples(tokenizer, rollout, count: int) -> list[dict]:
    """Queries, their answers, rewards and judge scores as text records."""
    rollout = {k: (None if v is None else np.asarray(v)) for k, v in rollout.items()}
    num_queries, group = rollout["reward"].shape
    records = []
    for i in range(min(count, num_queries)):
        query = tokenizer.decode(rollout["query_tokens"][i, : rollout["query_lengths"][i]])
        answers = []
        for j in range(group):
            row = i * group + j
            ids = rollout["answer_tokens"][row, : rollout["answer_lengths"][row]]
            answers.append(
                {
                    "answer": tokenizer.decode(ids),
                    "reward": float(rollout["reward"][i, j]),
                    "quality": None
                    if rollout["quality"] is None
                    else float(rollout["quality"][i, j]),
                }
            )
        records.append({"query": query, "answers": answers})
    return records


def _sample_text(sample: dict, width: int = 300) -> str:
    first = sample["answers"][0]
    clip = lambda s: s if len(s) <= width else s[:width] + "…"
    return f"  query:  {clip(sample['query'])!r}\n  answer: {clip(first['answer'])!r}"
