"""What a training run is checked for before anything is written, and what a refused run leaves behind.

``open_clip_starft.main`` calls ``preflight`` once, before upstream's ``main`` creates ``LOGS/NAME``,
``out.log`` or ``params.txt``: it parses upstream's flags as upstream will and refuses, in one line
and with nothing written, what would otherwise fail after the model and data are built (or would
run wrongly):

- ``--report-to``: every reporter named is known and its package is installed (upstream asserts
  only after the model and data are built, and the run's ``--name`` is then taken);
- frozen BatchNorm statistics (``--starft-freeze-bn-stats`` or upstream's
  ``--lock-image-freeze-bn-stats``) with ``--starft-teacher-batchnorm batch``: refused alike;
- the training files: every shard of a ``--train-data`` pattern exists (``data.checks``, the check
  eval and ``--starft-val`` make), a CSV file exists;
- a ``--resume`` file that holds weights only (``best.pt``): named with the commands that take it;
- a new run (no ``--resume latest``) on a ``--name`` whose folder holds another run's log;
- upstream's flags StarFT cannot honour (``params.refuse_unsupported``).

``finished`` says when ``--resume`` names a run that has nothing left to train (the entry point then
says so and how to train longer, and exits 0 without starting anything).

Checks that need the model or the data (the ``--starft-val`` sets, a ``--resume`` file's weights, the
labels) come later; for them ``RunFolderGuard`` removes the run folder a refused run created, as long as
the run had not reached its epoch loop and holds no checkpoint, so the corrected rerun can take the
same ``--name``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil

from open_clip_train.params import parse_args

from open_clip_starft.data.checks import check_shards_exist
from open_clip_starft.data.training import train_data_kind
from open_clip_starft.errors import ConfigError, DataError
from open_clip_starft.host import plugin
from open_clip_starft.host.checkpoint import latest_checkpoint, peek_resume, stored_position, training_position
from open_clip_starft.host.params import refuse_unsupported

REPORTERS = {"wandb": "wandb", "tensorboard": "tensorboard"}
"""``--report-to`` names → the package upstream imports for each (``all``: every one)."""


def upstream_args(starft: argparse.Namespace, rest: list[str]) -> argparse.Namespace:
    """Upstream's parsed flags (``rest``) with the StarFT ones (``starft``) added, as the hooks will see them."""
    extra = ["--loss", plugin.NAME, "--train-step", plugin.NAME] if plugin.host_has_plugin_hook() else []
    args = parse_args(list(rest) + extra)
    vars(args).update(vars(starft))
    return args


def check_reporters(report_to: str) -> None:
    """A ``ConfigError`` naming an unknown ``--report-to`` name, or a reporter whose package is not installed."""
    names = [n.strip() for n in (report_to or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in (*REPORTERS, "all")]
    if unknown:
        raise ConfigError(f"--report-to {report_to}: unknown reporter {unknown[0]!r}: use "
                          f"{', '.join(REPORTERS)}, all or a comma list of them")
    wanted = list(REPORTERS) if "all" in names else names
    missing = [REPORTERS[n] for n in wanted if importlib.util.find_spec(REPORTERS[n]) is None]
    if missing:
        raise ConfigError(f"--report-to {report_to} needs the {' and '.join(missing)} package(s), not installed: "
                          f"pip install {' '.join(missing)}, or drop {' and '.join(missing)} from --report-to")


def check_frozen_batchnorm(args: argparse.Namespace) -> None:
    """Student BatchNorm on frozen running statistics with a teacher on the batch's: refused, whichever flag
    freezes them (ours or upstream's ``--lock-image-freeze-bn-stats``)."""
    if args.starft_teacher_batchnorm != "batch":
        return
    for flag, on in (("--starft-freeze-bn-stats", args.starft_freeze_bn_stats),
                     ("--lock-image-freeze-bn-stats", getattr(args, "lock_image_freeze_bn_stats", False))):
        if on:
            raise ConfigError(f"{flag} keeps the student on running statistics, but --starft-teacher-batchnorm batch "
                              "puts the teacher on the batch's: drop --starft-teacher-batchnorm batch")


def check_train_files(args: argparse.Namespace) -> None:
    """The local training files exist: every shard of a webdataset pattern, or the CSV file."""
    path = args.train_data
    if not path:
        return
    kind = train_data_kind(args)
    if kind == "webdataset":
        check_shards_exist(path)
    elif kind == "csv" and "://" not in path and not os.path.isfile(path):
        raise DataError(f"--train-data {path!r} not found: check the CSV path")


def preflight(starft: argparse.Namespace, rest: list[str]) -> argparse.Namespace:
    """Every check that needs neither the model nor the data, before anything is written (see the module
    docstring); returns upstream's parsed flags with the StarFT ones, for ``finished`` and the guard."""
    args = upstream_args(starft, rest)
    refuse_unsupported(args)
    check_frozen_batchnorm(args)
    check_reporters(args.report_to)
    check_train_files(args)
    if args.resume and args.resume != "latest" and os.path.isfile(args.resume):
        peek_resume(args.resume)  # best.pt: weights only, said in one line (before the folder's own refusal)
    check_run_folder(args)
    return args


def run_folder(args: argparse.Namespace) -> str | None:
    """``LOGS/NAME``, None without logs or a name (upstream then makes one up)."""
    if not args.logs or str(args.logs).lower() == "none" or not args.name:
        return None
    return os.path.join(args.logs, args.name)


def check_run_folder(args: argparse.Namespace) -> None:
    """A new run (no ``--resume latest``) never takes a run folder that holds a run's log: refused in one
    line naming it (upstream prints "Experiment already exists. Use --name {}" and returns)."""
    folder = run_folder(args)
    if folder and args.resume != "latest" and not args.log_local and os.path.exists(os.path.join(folder, "out.log")):
        raise ConfigError(f"the run folder {folder} holds another run (out.log): pass a new --name, or "
                          "--resume latest to continue that run")


def finished(args: argparse.Namespace) -> str | None:
    """When ``--resume`` (``latest`` or a file) holds a run that has done all ``--epochs``: what to tell the
    user (nothing is left to train, and how to train longer); else None."""
    if args.resume is None or getattr(args, "remote_sync", None) is not None:
        return None
    path = args.resume
    if path == "latest":
        folder = run_folder(args)
        path = latest_checkpoint(os.path.join(folder, "checkpoints")) if folder else None
        position = training_position(path) if path else None
    else:
        try:  # a file named by the user: its content, never its name
            position = stored_position(path) if os.path.isfile(path) else None
        except Exception:  # noqa: BLE001 - model-only weights or unreadable: load_resume names what is wrong
            position = None
    if position != (args.epochs, 0):
        return None
    run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return (f"nothing is left to train: {path} has all {args.epochs} epoch(s) of --epochs {args.epochs} done. "
            f"To train longer, pass --epochs above {args.epochs} with --resume latest and "
            "--starft-allow-changed-settings (the λ and learning-rate schedules then span the new count); "
            f"to score it: open-clip-starft eval --run {run}")


class RunFolderGuard:
    """Leave nothing behind when a run is refused: on a failure (an exception, or upstream's refusal,
    ``refused``) before the run reached its epoch loop (``state.started``), the run folder this process
    created (``LOGS/NAME``, and ``LOGS`` itself when it made it and it is empty then) is removed, with
    the log handlers upstream opened in it; a folder that existed before, or holds a checkpoint, is kept.

    ``args``: upstream's flags from ``preflight`` (``logs``); ``hooks``: the run's ``StarftHooks``, whose
    ``args.name`` is the run's name once upstream has chosen it and whose ``state`` says if it started."""

    def __init__(self, args: argparse.Namespace, hooks):
        self.logs = args.logs if args.logs and str(args.logs).lower() != "none" else None
        self.hooks = hooks
        self.logs_existed = bool(self.logs) and os.path.isdir(self.logs)
        self.before = set(os.listdir(self.logs)) if self.logs_existed else set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.refused()
        return False

    def refused(self) -> None:
        """The run was refused: remove what it created (see the class docstring)."""
        args, state = self.hooks.args, self.hooks.state
        if self.logs is None or args is None or not args.name or state.started:
            return
        folder = os.path.join(self.logs, args.name)
        if args.name in self.before or not os.path.isdir(folder):
            return
        if any(name.endswith(".pt") for _, _, names in os.walk(folder) for name in names):
            return
        for handler in list(logging.root.handlers):  # upstream's out.log handler, opened in the folder
            if isinstance(handler, logging.FileHandler) and \
                    os.path.abspath(handler.baseFilename).startswith(os.path.abspath(folder) + os.sep):
                logging.root.removeHandler(handler)
                handler.close()
        shutil.rmtree(folder, ignore_errors=True)
        if not self.logs_existed and os.path.isdir(self.logs) and not os.listdir(self.logs):
            os.rmdir(self.logs)
