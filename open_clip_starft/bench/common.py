"""What every benchmark command shares: the default device (``eval.models``'s) and the JSON record files."""
from __future__ import annotations

from datetime import datetime, timezone

from open_clip_starft.data.files import merge_json
from open_clip_starft.eval.models import default_device  # noqa: F401 - the --device default of every bench command


def today() -> str:
    """The UTC date records carry, ``YYYY-MM-DD``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def add_record(out: str, record: dict, key: tuple) -> None:
    """Add ``record`` to the JSON list in ``out``, replacing one with the same ``key`` fields."""
    def replace(records: list) -> list:
        return [r for r in records if tuple(r.get(k) for k in key) != tuple(record[k] for k in key)] + [record]
    merge_json(out, replace, empty=[])
