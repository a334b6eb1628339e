"""What every benchmark command shares: the default device and the JSON record files."""
from __future__ import annotations

from datetime import datetime, timezone

import torch

from open_clip_starft.data.files import merge_json


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (the ``--device`` default of every bench command)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def today() -> str:
    """The UTC date records carry, ``YYYY-MM-DD``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def add_record(out: str, record: dict, key: tuple) -> None:
    """Add ``record`` to the JSON list in ``out``, replacing one with the same ``key`` fields."""
    def replace(records: list) -> list:
        return [r for r in records if tuple(r.get(k) for k in key) != tuple(record[k] for k in key)] + [record]
    merge_json(out, replace, empty=[])
