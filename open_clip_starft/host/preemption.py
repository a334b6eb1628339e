"""Preemption: on SIGUSR1 or SIGTERM finish the current step, save, exit 0.

SLURM sends a signal before a job's time limit (``#SBATCH --signal=B:USR1@120``) and on
preemption. The handler only sets a flag; the train step reads it once per step (agreed across
processes in the step's one per-step all-gather), and after that step's optimizer step writes a
checkpoint that ``--resume latest`` picks up (``checkpoint.save_mid_epoch``) and raises
``Preempted``, which the entry point turns into exit status 0. The checkpoint records how many
batches of the epoch were done, so the resumed run finishes with the same step count.

``FLAG`` is module-level because signal handlers are process-wide: ``main`` installs it, the
step reads it; it carries no run state but "a signal came".
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; carries its path."""


class PreemptionFlag:
    """Set by the signal handler; read (and agreed on across processes) by the training loop."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signal_number = signum

    @property
    def pending(self) -> bool:
        """True once SIGUSR1 or SIGTERM arrived in this process."""
        return self.signal_number is not None


FLAG = PreemptionFlag()
