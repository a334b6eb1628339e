"""Preemption: on SIGUSR1 or SIGTERM finish the current step, save, exit 0.

SLURM sends a signal before a job's time limit (``#SBATCH --signal=B:USR1@120``) and on
preemption. The handler only sets a flag; the training loop checks it after each optimizer step
(agreeing across processes), writes a checkpoint that ``--resume latest`` picks up, and raises
``Preempted``, which the entry point turns into exit status 0. The checkpoint records how many
batches of the epoch were done, so the resumed run finishes with the same step count.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

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

    def requested(self, distributed: bool, device) -> bool:
        """True when any process got a signal (one all-reduce per call under torch.distributed)."""
        flag = self.signal_number is not None
        if distributed and dist.is_initialized():
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


FLAG = PreemptionFlag()


def checkpoint_name(epoch: int, batches_done: int) -> str:
    """``epoch_{E}_step_{K}.pt`` for K batches done in epoch E (0-based): by OpenCLIP's natural sort
    it comes after ``epoch_E.pt`` and before ``epoch_{E+1}.pt``, so ``--resume latest`` takes it."""
    return f"epoch_{epoch}_step_{batches_done}.pt"
