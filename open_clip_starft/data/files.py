"""Files written whole or not at all: the one atomic writer of the package, and the JSON helpers on it.

Every file the package writes for a user (checkpoints, shards, manifests, records, model cards,
``params.txt``) goes through ``atomic_path``: it is written under a temporary name beside the target,
unique per process (``NAME.partial-PID``, so two processes writing the same name never share one), and
renamed over the target only when complete. A crash leaves the target as it was; a failed write
removes its temporary file; a full disk is reported in one line (``StorageError``) naming the device,
the file and the space it needed, instead of a library's traceback.

Every JSON the package writes is strict (RFC 8259): ``json_text`` is the one encoder (non-finite
numbers, which Python's ``json`` would write as the non-standard ``NaN``/``Infinity`` that strict
parsers reject, become ``null``); ``write_json`` and ``json_line`` use it.

``merge_json`` is the one merge-on-write (read, update, write back under a lock), for records that
several processes add to.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
from typing import Iterator

from open_clip_starft.errors import StorageError

PARTIAL = ".partial"
"""Suffix of the temporary files (``NAME.partial-PID``); readers skip names containing it."""

# torch's zip writer reports a full disk as a RuntimeError with one of these phrases, not an OSError
_DISK_FULL_PHRASES = ("file write failed", "unexpected pos", "No space left")


def partial_name(path: str) -> str:
    """The temporary name ``path`` is written under by this process."""
    return f"{os.fspath(path)}{PARTIAL}-{os.getpid()}"


def _device_of(path: str) -> str:
    """The mount point holding ``path`` (for messages)."""
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and any(p in str(error) for p in _DISK_FULL_PHRASES)


def _storage_error(error: BaseException, path: str, written: int) -> StorageError | None:
    """A one-line StorageError for a write of ``path`` that failed with ``error``, or None when the
    failure is not the disk's."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if _is_disk_full(error):
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        return StorageError(f"no space left on {_device_of(folder)} writing {path} (needed more than "
                            f"{written / 2**20:.0f} MB, {free / 2**20:.0f} MB free): free space or write elsewhere; "
                            "nothing earlier was changed")
    if isinstance(error, PermissionError) or (isinstance(error, OSError) and error.errno == errno.EROFS):
        return StorageError(f"cannot write {path}: {os.strerror(error.errno)} ({folder}): "
                            "choose a folder you can write to")
    return None


def _umask() -> int:
    """This process's umask (read from ``/proc/self/status`` where Linux gives it, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_default_mode(partial: str) -> None:
    """A regular file gets the permissions ``open()`` gives a new file (``0o666`` less the umask): some
    writers (safetensors) create theirs readable by the owner only, though the file is meant to be shared."""
    if os.path.isfile(partial) and not os.path.islink(partial):
        mode = 0o666 & ~_umask()
        if os.stat(partial).st_mode & 0o777 != mode:
            os.chmod(partial, mode)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield the temporary path to write ``path``'s content to; on success it is renamed to ``path``
    with the permissions of a newly created file (``0o666`` less the umask), whichever library wrote it.

    On any failure the temporary file is removed and ``path`` is untouched; a full disk, a read-only
    folder or a permission error become a one-line ``StorageError``."""
    path = os.fspath(path)
    partial = partial_name(path)
    try:
        yield partial
        _give_default_mode(partial)
        os.replace(partial, path)
    except BaseException as e:
        written = os.path.getsize(partial) if os.path.exists(partial) else 0
        with contextlib.suppress(OSError):
            os.remove(partial)
        storage = _storage_error(e, path, written)
        if storage is not None:
            raise storage from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder to write the folder ``path``'s content to (``PATH.partial-PID``); on
    success it replaces ``path``: an existing ``path`` is renamed away (``PATH.partial-PID-old``), the
    new folder renamed in, then the old one deleted, so ``path`` is at every moment the old folder
    or the new one. On failure the temporary folder is removed and ``path`` is untouched; a full disk,
    a read-only folder or a permission error become a one-line ``StorageError``."""
    path = os.fspath(path).rstrip(os.sep) or os.sep
    partial, old = partial_name(path), partial_name(path) + "-old"
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        os.makedirs(partial)
        yield partial
        if os.path.lexists(path):
            os.rename(path, old)
        try:
            os.rename(partial, path)
        except BaseException:
            if os.path.lexists(old):
                os.rename(old, path)  # put the old folder back
            raise
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        storage = _storage_error(e, path, 0)
        if storage is not None:
            raise storage from None
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """``open(path, mode)`` written atomically (see ``atomic_path``); ``mode`` "w" or "wb"."""
    with atomic_path(path) as partial:
        with open(partial, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def write_text(path: str, text: str) -> None:
    """``text`` as the whole content of ``path``, atomically."""
    with atomic_open(path) as f:
        f.write(text)


def strict_json_value(obj):
    """``obj`` with every non-finite float (NaN, ±Infinity) replaced by None, in dicts, lists and tuples
    at any depth (an undefined metric is ``null``, never the ``NaN`` strict JSON parsers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = None, sort_keys: bool = False) -> str:
    """``obj`` as strict JSON text (``strict_json_value``; non-ASCII kept): the package's one JSON encoder."""
    return json.dumps(strict_json_value(obj), indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)


def json_line(obj) -> str:
    """``obj`` as one line of a JSON-lines file (strict JSON, ending in a newline)."""
    return json_text(obj) + "\n"


def write_json(path: str, obj, indent: int | None = 1, sort_keys: bool = False) -> None:
    """``obj`` as strict JSON (``json_text``) at ``path``, atomically (UTF-8, non-ASCII kept)."""
    with atomic_open(path) as f:
        f.write(json_text(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str, default=None):
    """The JSON at ``path``, or ``default`` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def merge_json(path: str, update, indent: int | None = 1, sort_keys: bool = False, empty=None):
    """Merge-on-write: read the JSON at ``path`` (``empty``, default ``{}``, when absent), apply ``update`` (a
    dict to merge key by key into an object, or a function old → new), write it back atomically, and return it. An exclusive
    lock on the folder (no lock file is left behind) makes concurrent callers (one per process or machine share)
    take turns, so none drops another's keys."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = read_json(path, {} if empty is None else empty)
        new = update(old) if callable(update) else {**old, **update}
        write_json(path, new, indent=indent, sort_keys=sort_keys)
        return new
    finally:
        os.close(lock)  # closing releases the lock
