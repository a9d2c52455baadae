"""Orbax checkpoints of a run's full train state (resume after preemption)."""

import orbax.checkpoint as ocp

from lsp_jax import paths
from lsp_jax.errors import UserError
from lsp_jax.weights.runs import checkpoint_manager, find_run, read_run_info, write_run_info

__all__ = [
    "checkpoint_manager",
    "find_run",
    "read_run_info",
    "restore",
    "restore_newest_intact",
    "finish",
    "save",
    "write_run_info",
]

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
