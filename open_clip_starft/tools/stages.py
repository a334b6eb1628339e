"""The one subprocess stage runner: a training (or any module) run as ``python -m MODULE ARGS`` with its
output in a console log file, a set number of compute threads and its time taken.

The demo and the Waterbirds-lite study run every training through it, so a run's console, exit status
and failure message look the same everywhere; ``export_checkpoint`` turns a stage's checkpoint into a
``local-dir:`` model for the next stage.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time

from open_clip_starft.errors import StarftError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Environment for runs that must never reach a model hub."""

_TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \((\d+)%\)\]")


def training_progress(console: str) -> str | None:
    """The last ``Train Epoch: E [n/N (p%)]`` position in an OpenCLIP console log, as ``epoch E p%``;
    None before the first logged step."""
    try:
        with open(console, errors="replace") as f:
            found = _TRAIN_LINE.findall(f.read()[-20000:])
    except OSError:
        return None
    if not found:
        return None
    epoch, _, _, percent = found[-1]
    return f"epoch {int(epoch) + 1} {percent}%"


def _load_prctl():
    """libc's ``prctl`` on Linux (None elsewhere), resolved once in the parent so the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _prepare_child(parent_pid: int, own_group: bool) -> None:
    """In the child between fork and exec: lead a process group of its own (``own_group``), and ask the
    kernel to SIGKILL it when the thread that started it ends (``kill -9`` of the runner included); if
    the parent is already gone, end now."""
    if own_group:
        os.setpgid(0, 0)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _signal_child(process: subprocess.Popen, sig: int, own_group: bool) -> None:
    """``sig`` to the child's whole process group (its data workers, torchrun's workers), or to the child
    alone when it shares the caller's group."""
    try:
        if own_group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except ProcessLookupError:
        pass


class StageStopped(StarftError):
    """The runner was sent SIGTERM or SIGUSR1 (a scheduler's preemption or time limit) while a stage ran;
    the stage was passed the signal and has ended."""


class StopSignals:
    """While a stage runs in the main thread, SIGTERM and SIGUSR1 to the runner raise ``StageStopped``
    (once; repeats are ignored until the stage has ended) instead of ending the runner at once, which
    would kill the child (``PR_SET_PDEATHSIG``) before it could save; ``signum`` is the one received."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise StageStopped(signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def stop_stage(process: subprocess.Popen, own_group: bool, grace_s: float, sig: int = signal.SIGTERM) -> None:
    """Stop a running stage: ``sig`` first (SIGTERM or SIGUSR1: a StarFT training finishes its step, saves
    a checkpoint that ``--resume latest`` continues from, and exits), SIGKILL after ``grace_s`` s or on a
    second interrupt."""
    try:
        _signal_child(process, sig, own_group)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if own_group or process.poll() is None:
            _signal_child(process, signal.SIGKILL, own_group)  # with the group: leftover workers too
        process.wait()


def start_stage(command: list[str], out, env: dict) -> tuple[subprocess.Popen, bool]:
    """``command`` started with stdout and stderr into ``out``; returns ``(process, own_group)``.

    The child dies with the thread that starts it (Linux ``PR_SET_PDEATHSIG``: ``kill -9`` of the runner
    leaves no training behind). Started from the main thread it leads its own process group, so an
    interrupt stops the whole group (``stop_stage``); from a worker thread (a pool of parallel stages) it
    stays in the caller's group, so that a terminal's Ctrl-C, which the main thread cannot pass on to a
    worker's wait, still reaches it."""
    own_group = threading.current_thread() is threading.main_thread()
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                               preexec_fn=functools.partial(_prepare_child, os.getpid(), own_group))
    return process, own_group


def _wait(process: subprocess.Popen, console: str, start: float, *, what: str, timeout: float | None,
          on_poll, poll_s: float) -> int:
    """The child's exit status, calling ``on_poll(console)`` every ``poll_s`` s; past ``timeout`` s a
    StarftError (the caller stops the child)."""
    while True:
        try:
            return process.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if timeout is not None and time.time() - start > timeout:
                raise StarftError(f"{what} ran past its {timeout:.0f} s limit and was stopped; "
                                  f"its output: {console}") from None
            if on_poll is not None:
                on_poll(console)


def run_stage(module: str, args: list[str], console: str, *, what: str, threads: int | None = None,
              env: dict | None = None, timeout: float | None = None, launcher: list[str] | None = None,
              on_poll=None, poll_s: float = 10.0, tail_lines: int = 12, grace_s: float = 60.0) -> float:
    """Run ``python -m module *args`` (or ``*launcher, module, *args``, e.g. torchrun's ``-m --``) with
    stdout and stderr in ``console``; return its wall time in seconds.

    ``threads`` sets ``OMP_NUM_THREADS`` (None: the caller's environment, else 1); ``env`` adds variables;
    ``on_poll(console)`` is called every ``poll_s`` s while it runs (progress). A non-zero exit or a run past
    ``timeout`` s raises a StarftError naming ``what``, the status and the end of the console log. An
    interrupt (or the timeout) stops the child with ``stop_stage`` (SIGTERM, SIGKILL after ``grace_s`` s);
    SIGTERM or SIGUSR1 to the caller is passed on the same way and ends in ``StageStopped``
    (``StopSignals``); ``kill -9`` of the caller kills the child too (``start_stage``).
    """
    command = [*(launcher or [sys.executable, "-m"]), module, *args]
    full_env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if threads is not None:
        full_env["OMP_NUM_THREADS"] = str(threads)
    os.makedirs(os.path.dirname(os.path.abspath(console)), exist_ok=True)
    start = time.time()
    with open(console, "w") as out, StopSignals() as stop:
        process, own_group = start_stage(command, out, full_env)
        try:
            status = _wait(process, console, start, what=what, timeout=timeout, on_poll=on_poll, poll_s=poll_s)
        except BaseException as e:
            if process.poll() is None:  # interrupted, signalled or past its time: never leave the run behind
                stop_stage(process, own_group, grace_s, stop.signum or signal.SIGTERM)
            if isinstance(e, StageStopped):
                raise StageStopped(f"{what} was stopped by {e} (passed on to it: a training saves a checkpoint "
                                   f"first); rerun the same command to continue. Its output: {console}") from None
            raise
    if status != 0:
        with open(console, errors="replace") as f:
            tail = "".join(f.readlines()[-tail_lines:])
        raise StarftError(f"{what} failed (exit {status}); the end of {console}:\n{tail}")
    return time.time() - start


def export_checkpoint(checkpoint: str, model: str, out_dir: str) -> str:
    """A stage's training checkpoint as a ``local-dir:OUT_DIR`` model for the next stage, through the one
    exporter (``tools.export.export_model``: config and tokenizer files from ``model``, a ``local-dir:``
    folder or a model name, the run's forced settings, a load-back check); returns the ``--model`` value."""
    from open_clip_starft.tools.export import export_model  # here: the runner itself needs no torch

    return export_model(checkpoint, out_dir, model=model)[0]
