"""Stopping for a preemption notice (SIGTERM) at an iteration every host agrees on.

One process: a SIGTERM handler sets a flag, read before each call of the compiled
iterations. Several processes (jax.distributed, a TPU pod or a multi-node GPU job): a
per-process flag would let the host that got the signal stop while the others enter the
next collective or save and hang. JAX's distributed runtime owns SIGTERM there (its
preemption notifier, started by jax.distributed.initialize): a notice on any host starts
a protocol that picks the first call number past the highest one any host has reached,
and `reached_preemption_sync_point` answers True on every host at that same call. Every
host then saves the same iteration and exits.
"""

import contextlib
import signal

import jax


class Preemption:
    """Asked once per call of the compiled iterations, on every host, whether to stop."""

    def __init__(self, coordinated: bool):
        self.coordinated = coordinated
        self.stopped = False
        self._received = False  # One process: set by the SIGTERM handler.
        self._calls = 0  # Several: every host counts the same calls from its start.

    def _on_sigterm(self, signum, frame) -> None:
        self._received = True

    def reached(self) -> bool:
        """True from the call at which every host stops (call it once per call)."""
        if self.stopped:
            return True
        if self.coordinated:
            from jax.experimental import multihost_utils

            self.stopped = multihost_utils.reached_preemption_sync_point(self._calls)
            self._calls += 1
        else:
            self.stopped = self._received
        return self.stopped


def _sync_manager():
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager


@contextlib.contextmanager
def watch():
    """A Preemption for this process; call after jax.distributed.initialize (if any).

    The SIGTERM handler is installed only for a single process: on several, installing
    one would take the signal away from JAX's notifier.
    """
    coordinated = jax.process_count() > 1 and _sync_manager() is not None
    preemption = Preemption(coordinated)
    if coordinated:
        yield preemption
        return
    previous = signal.signal(signal.SIGTERM, preemption._on_sigterm)
    try:
        yield preemption
    finally:
        signal.signal(signal.SIGTERM, previous)
