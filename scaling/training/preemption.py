"""Preemption: a stop signal ends a run at the next step with a checkpoint of that step, so the
job a launcher requeues (SLURM, submitit) resumes exactly where it stopped.

SIGTERM is the scheduler's notice (SLURM preemption, `scancel`, the time limit's grace period);
SIGUSR2 is submitit's (its handler requeues the job). After the checkpoint the signal goes on to
the handler that was there before (submitit's requeue, or the default: the process ends by the
signal). With several processes, JAX's preemption sync point picks the step they all save at.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Self

import jax

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopSignals:
    """While open, records a stop signal instead of dying of it; `forward()` re-delivers it."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals, self.received = signals, None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        # only the main thread can catch signals; with several processes JAX's own SIGTERM
        # handler (jax.distributed's preemption notifier) must stay in place
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = (signum, frame)

    def requested(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step`: a signal here, or with several
        processes the sync point JAX agreed on once any of them got one."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def forward(self) -> None:
        """Hands the signal to the handler it would have met without us; with several
        processes, ends this one as the signal would have (status 128 + SIGTERM)."""
        if jax.process_count() > 1:
            raise SystemExit(128 + signal.SIGTERM)
        signum, frame = self.received or (signal.SIGTERM, None)
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)
