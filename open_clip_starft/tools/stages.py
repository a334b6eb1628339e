"""The one subprocess stage runner: a training (or any module) run as ``python -m MODULE ARGS`` with its
output in a console log file, a set number of compute threads and its time taken.

The demo and the Waterbirds-lite study run every training through it, so a run's console, exit status
and failure message look the same everywhere; ``export_checkpoint`` turns a stage's checkpoint into a
``local-dir:`` model for the next stage.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from open_clip_starft.errors import StarftError
from open_clip_starft.tools.export import export_model

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


def run_stage(module: str, args: list[str], console: str, *, what: str, threads: int | None = None,
              env: dict | None = None, timeout: float | None = None, launcher: list[str] | None = None,
              on_poll=None, poll_s: float = 10.0, tail_lines: int = 12) -> float:
    """Run ``python -m module *args`` (or ``*launcher, module, *args``, e.g. torchrun's ``-m --``) with
    stdout and stderr in ``console``; return its wall time in seconds.

    ``threads`` sets ``OMP_NUM_THREADS`` (None: the caller's environment, else 1); ``env`` adds variables;
    ``on_poll(console)`` is called every ``poll_s`` s while it runs (progress). A non-zero exit or a run past
    ``timeout`` s raises a StarftError naming ``what``, the status and the end of the console log.
    """
    command = [*(launcher or [sys.executable, "-m"]), module, *args]
    full_env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if threads is not None:
        full_env["OMP_NUM_THREADS"] = str(threads)
    os.makedirs(os.path.dirname(os.path.abspath(console)), exist_ok=True)
    start = time.time()
    with open(console, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        try:
            while True:
                try:
                    status = process.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    if timeout is not None and time.time() - start > timeout:
                        process.kill()
                        process.wait()
                        raise StarftError(f"{what} ran past its {timeout:.0f} s limit and was stopped; "
                                          f"its output: {console}") from None
                    if on_poll is not None:
                        on_poll(console)
        except BaseException:
            if process.poll() is None:  # interrupted: never leave the run behind
                process.kill()
                process.wait()
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
    return export_model(checkpoint, out_dir, model=model)[0]
