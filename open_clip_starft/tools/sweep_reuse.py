"""What a sweep may reuse: a finished run only when it was trained with the settings asked for now, a
cached score only when it was computed from the same weights on the same sets.

A run's settings are read from its ``params.txt`` (OpenCLIP writes every argument there as
``name: value``) and compared with the values the training parsers give for the flags the sweep would
pass now (``expected_params``), leaving out bookkeeping that does not change the weights
(``BOOKKEEPING``: paths of logs, the device, worker counts, logging and saving frequencies). Settings
whose value names a file or a ``local-dir:`` model (class names, a descriptor file, templates, the
model, a weights file) are also compared by content: the sweep records the files' sha256 when it
starts a run (``RUN_RECORDS``) and the final checkpoint's when it ends, and compares them with the files
as they are now. A cached score carries a key (model, checkpoint content, α, sets: root and format,
class names content) and is used only under an equal key.

``Fingerprints`` computes the sha256 of files and folders once and keeps it in ``FINGERPRINTS`` under
--out, keyed by path and checked against the file's size, mtime and inode.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os

import open_clip_train.params as host_params

from open_clip_starft.data.files import PARTIAL, merge_json, read_json
from open_clip_starft.errors import ConfigError
from open_clip_starft.host.params import build_parser as starft_parser

RUN_RECORDS = "runs.json"
"""File under --out: per run name, the content fingerprints of its files when it was started, and of
its final checkpoint when it ended."""
FINGERPRINTS = "fingerprints.json"
"""File under --out: sha256 of the files the sweep has read, by absolute path."""

BOOKKEEPING = frozenset({
    "logs", "name", "resume", "checkpoint_path", "log_path", "tensorboard_path", "tensorboard", "wandb", "wandb_notes",
    "wandb_project_name", "report_to", "rank", "local_rank", "world_size", "distributed", "dist_url", "dist_backend",
    "no_set_device_rank", "horovod", "device", "workers", "log_every_n_steps", "log_level", "log_local", "debug",
    "copy_codebase", "save_frequency", "save_most_recent", "delete_previous_checkpoint", "remote_sync",
    "remote_sync_frequency", "remote_sync_protocol", "val_data", "val_num_samples", "val_frequency",
    "zeroshot_frequency", "imagenet_val", "imagenet_v2", "distill", "starft_num_classes",
})
"""params.txt entries that say where and how a run was logged or run, not what weights it trains."""

_CHUNK = 1 << 20


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, _CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class Fingerprints:
    """sha256 of files (and of ``local-dir:`` folders: of their files' names and hashes), each file
    hashed once: the hash is kept in the JSON file ``cache_path`` by absolute path with the size,
    mtime (ns) and inode it was computed for, and recomputed when any of them changed."""

    def __init__(self, cache_path: str):
        self.cache_path = cache_path
        self.known = read_json(cache_path, {})

    def file(self, path: str) -> str:
        path = os.path.abspath(path)
        st = os.stat(path)
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        entry = self.known.get(path)
        if entry and all(entry.get(k) == v for k, v in stamp.items()):
            return entry["sha256"]
        entry = {**stamp, "sha256": _sha256(path)}
        self.known[path] = entry
        merge_json(self.cache_path, {path: entry})
        return entry["sha256"]

    def folder(self, path: str) -> str:
        """One hash over the folder's files (names relative to it, skipping partial files; links not followed)."""
        digest = hashlib.sha256()
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                if PARTIAL in name or not os.path.isfile(full) or os.path.islink(full):
                    continue
                digest.update(f"{os.path.relpath(full, path)}\0{self.file(full)}\n".encode())
        return digest.hexdigest()

    def of_value(self, value: str) -> str | None:
        """The content fingerprint of a setting's value that names files: a ``local-dir:`` folder, a
        file, or a comma list with files in it; None when it names none."""
        if value.startswith("local-dir:") and os.path.isdir(value[len("local-dir:"):]):
            return "folder:" + self.folder(value[len("local-dir:"):])
        parts = [p for p in value.split(",") if p] if "," in value else [value]
        hashes = [self.file(p) for p in parts if os.path.isfile(p)]
        return ",".join(hashes) if hashes else None


def expected_params(train_argv: list[str]) -> dict[str, str]:
    """What ``params.txt`` would record for a training with ``train_argv`` (the StarFT flags, then
    OpenCLIP's, with OpenCLIP's model-dependent defaults), as text, without ``BOOKKEEPING``."""
    starft, rest = starft_parser().parse_known_args(train_argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            host = host_params.parse_args(rest)
    except SystemExit:
        why = (captured.getvalue().strip().splitlines() or ["not accepted"])[-1]
        raise ConfigError(f"the training flags {' '.join(rest)!r}: {why}") from None
    values = {**vars(host), **vars(starft)}
    return {k: str(v) for k, v in values.items() if k not in BOOKKEEPING}


def content_of(expected: dict[str, str], fingerprints: Fingerprints) -> dict[str, str]:
    """The content fingerprints of the settings whose values name files (``Fingerprints.of_value``)."""
    found = {key: fingerprints.of_value(value) for key, value in expected.items()}
    return {key: fp for key, fp in found.items() if fp is not None}


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else "…" + value[-limit:]


def params_differences(params_path: str, expected: dict[str, str], defaults: dict[str, str]) -> list[str]:
    """Each setting whose ``params.txt`` value differs from ``expected``, as ``name OLD (now NEW)``; a
    setting the file does not record (a flag newer than the run) differs when ``expected`` is not its
    default."""
    from open_clip_starft.eval.models import read_params  # torch: imported when a run is compared
    recorded = {k: str(v) for k, v in read_params(params_path).items()}
    diffs = []
    for key, want in sorted(expected.items()):
        have = recorded.get(key, defaults.get(key, want))
        if have != want:
            diffs.append(f"{key} {_short(have)} (now {_short(want)})" if key in recorded else
                         f"{key} not recorded (now {_short(want)})")
    return diffs


def content_differences(record: dict | None, content: dict[str, str], expected: dict[str, str]) -> list[str]:
    """Each file-valued setting whose content differs from what ``record`` (the run's entry of
    ``RUN_RECORDS``) says it was when the run started."""
    if record is None:
        return ["no record of its files' content (not started by this sweep's --out)"] if content else []
    old = record.get("content", {})
    return [f"content of {key} {_short(expected[key])}" for key in sorted(set(content) | set(old))
            if content.get(key) != old.get(key)]


def run_records(out: str) -> dict:
    return read_json(os.path.join(out, RUN_RECORDS), {})


def _set_entry(name: str, entry: dict | None, records: dict) -> dict:
    records.pop(name, None)
    return records if entry is None else {**records, name: entry}


def record_run(out: str, name: str, entry: dict | None) -> None:
    """Set (or with None remove) run ``name``'s entry of ``RUN_RECORDS`` (merged under a lock: the
    tasks of a job array each record their own run)."""
    merge_json(os.path.join(out, RUN_RECORDS), functools.partial(_set_entry, name, entry))


def key_differences(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """The fields in which a cached score's key ``old`` differs from ``new`` (nested keys as ``a.b``)."""
    if not isinstance(old, dict):
        return ["no key (cached by an older sweep)"] if not prefix else [prefix.rstrip(".")]
    diffs = []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field), new.get(field)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += key_differences(a, b, f"{prefix}{field}.")
        elif a != b:
            diffs.append(f"{prefix}{field} {_short(str(a), 24)} (now {_short(str(b), 24)})")
    return diffs


def summary(diffs: list[str], most: int = 3) -> str:
    """At most ``most`` differences on one line, and how many more."""
    more = f" and {len(diffs) - most} more" if len(diffs) > most else ""
    return "; ".join(diffs[:most]) + more
