"""One training process per run folder: a lock held while a run trains.

Two runs started with the same ``--logs``/``--name`` (two ``--resume latest`` of one preempted job,
a requeue racing the job it replaces) would append to one ``out.log``, rewrite one ``params.txt`` and
write the same ``epoch_N.pt`` names, each overwriting the other's. The master process of a run takes
an exclusive lock on ``RUN/train.lock`` before upstream writes anything there; a second run refuses in
one line naming the folder and the process holding it. The kernel drops the lock when its holder
exits, however it ends (a killed run never leaves a stale lock); its forked children (data-loader workers)
share the lock until they exit too, so a run finding the lock held by a dead process waits for them
(``ORPHAN_WAIT_S``).

A run killed while writing a file (``kill -9`` during ``best.pt`` or ``epoch_N.pt``) leaves its temporary
``NAME.partial-PID`` (``data.files.atomic_path``); the next run to take the lock removes those of processes
that no longer exist (``remove_stale_partials``).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import time

from open_clip_starft.data.files import PARTIAL
from open_clip_starft.errors import ConfigError, StorageError

NAME = "train.lock"
ORPHAN_WAIT_S = 60  # how long a new run waits for a dead holder's child processes to let the lock go
_PARTIAL_PID = re.compile(re.escape(PARTIAL) + r"-(\d+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(folder: str) -> list[str]:
    """Remove the temporary files (and folders) under ``folder`` that a process which no longer exists
    left (``NAME.partial-PID``, ``NAME.partial-PID-old``); returns their paths."""
    removed = []
    for parent, dirs, names in os.walk(folder):
        for name in [*names, *dirs]:
            match = _PARTIAL_PID.search(name)
            if match is None or _alive(int(match.group(1))):
                continue
            path = os.path.join(parent, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
        dirs[:] = [d for d in dirs if not _PARTIAL_PID.search(d)]
    return removed


class RunLock:
    """An exclusive, non-blocking lock on ``folder/train.lock`` (``acquire`` / ``release``)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, creating ``folder``; a ``ConfigError`` when another process holds it, a
        ``StorageError`` when the folder cannot be written."""
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot write to the run folder {self.folder}: {e.strerror}: choose a logs folder "
                               "you can write to") from None
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                # the holder is dead but its forked children (data-loader workers) share the lock until they
                # exit, seconds after a kill -9 of the run: wait for them rather than refuse a resume
                orphans = holder.isdigit() and not _alive(int(holder))
                if not orphans or time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(f"the run folder {self.folder} is in use by another training process (pid "
                                      f"{holder}{', exited; its child processes still hold it' if orphans else ''}): "
                                      "wait for it to end, or pass another --name") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        for path in remove_stale_partials(self.folder):  # no training process of this folder is writing now
            logging.warning(f"StarFT: removed {path}, the unfinished write of a run that was killed")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
