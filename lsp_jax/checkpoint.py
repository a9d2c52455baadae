"""Orbax checkpoints of a run's full train state (resume after preemption)."""

import orbax.checkpoint as ocp

from lsp_jax.weights.runs import checkpoint_manager, find_run, read_run_info, write_run_info

__all__ = ["checkpoint_manager", "find_run", "read_run_info", "restore", "save", "write_run_info"]


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the full train state (onto the shardings of `abstract_state`)."""
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
