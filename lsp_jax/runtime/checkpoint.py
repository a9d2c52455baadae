"""A run's workdir on disk: its run.json, and orbax checkpoints of its full train state
(resume after preemption). lsp_jax.weights.runs reads a run's policy weights from them."""

import json

import orbax.checkpoint as ocp

from lsp_jax.errors import UserError
from lsp_jax.runtime import paths

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"  # Written by the trainer: the model source and its architecture.


def write_run_info(workdir, info: dict) -> None:
    """Writes WORKDIR/run.json atomically (a renamed temporary file locally, one object
    write on a store such as gs://)."""
    paths.write_text(paths.join(workdir, RUN_FILE), json.dumps(info, indent=2))


def read_run_info(workdir) -> dict:
    path = paths.join(workdir, RUN_FILE)
    if not paths.isfile(path):
        raise UserError(f"{workdir} is not an lsp_jax run folder: {RUN_FILE} is missing.")
    return json.loads(paths.read_text(path))


def find_run(path) -> tuple[str, int | None] | None:
    """(workdir, step) if `path` is a run workdir or one of its step folders, else None.
    Local paths come back absolute; URIs (gs://...) without trailing slashes."""
    path = paths.normalize(path)
    if paths.isfile(paths.join(path, RUN_FILE)):
        return path, None
    parent = paths.dirname(path)
    if paths.basename(parent) == CHECKPOINT_DIR and paths.basename(path).isdigit():
        workdir = paths.dirname(parent)
        if paths.isfile(paths.join(workdir, RUN_FILE)):
            return workdir, int(paths.basename(path))
    return None


def checkpoint_manager(workdir, *, keep: int | None = None, background: bool = False):
    """Orbax manager over WORKDIR/checkpoints. Orbax writes each step to a temporary
    folder and renames it when complete, so a killed save never looks like a checkpoint
    (on GCS it marks complete steps with a commit file instead). background: `save`
    returns once the state is copied off the devices and the files are written by a
    thread (`finish` waits for it)."""
    paths.check_backend(workdir)
    directory = paths.normalize(paths.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=background
    )
    return ocp.CheckpointManager(directory, options=options)


DAMAGED_SUFFIX = ".damaged"  # Orbax lists only folders named by a step number.


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    """Writes a checkpoint of `state`. With a background manager it returns once the
    state is copied to host memory, and training goes on while orbax writes the files
    in a thread; the next save waits for this one, and so must every exit (`finish`).
    Orbax writes into a temporary folder and renames it when complete, so a process
    killed mid-write leaves the previous checkpoint as the newest one."""
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight, if any (raises its error, if it failed)."""
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the full train state (onto the shardings of `abstract_state`)."""
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_newest_intact(workdir, manager, abstract_state, *, keep, log, background=False):
    """(state, manager) from the newest checkpoint that restores.

    A newer step folder that fails to restore while an older one restores is damaged (a
    truncated file, a deleted metadata file): it is renamed STEP.damaged, so that it is
    kept for inspection but neither listed nor overwritten, and one line names it. When
    no step restores, the problem is not damage (e.g. the config changed since the run
    was made): UserError, nothing renamed.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = restore(manager, abstract_state, step)
        except Exception as error:  # Orbax and tensorstore raise many types.
            failures.append((step, error))
            continue
        if failures:
            _set_aside(workdir, manager, failures, step, log=log)
            manager = checkpoint_manager(workdir, keep=keep, background=background)
        return state, manager
    detail = "; ".join(f"step {s}: {type(e).__name__}: {_first_line(e)}" for s, e in failures)
    raise UserError(
        f"No checkpoint in {paths.join(workdir, 'checkpoints')} could be restored ({detail}). "
        "If the config changed since this run was made (model, optimizer), train in a new "
        "--workdir."
    )


def _first_line(error) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _set_aside(workdir, manager, failures, good_step, *, log) -> None:
    import jax

    manager.close()
    for step, error in failures:
        folder = paths.join(workdir, "checkpoints", str(step))
        target = folder + DAMAGED_SUFFIX
        if jax.process_index() == 0:  # One host moves the shared folder.
            number = 1
            while paths.exists(target):
                number += 1
                target = f"{folder}{DAMAGED_SUFFIX}{number}"
            paths.epath(folder).rename(paths.epath(target))
        log(
            f"Checkpoint {folder} is damaged ({type(error).__name__}: {_first_line(error)}); "
            f"moved it to {target} and resumed from step {good_step}."
        )
