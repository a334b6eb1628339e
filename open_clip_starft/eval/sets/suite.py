"""Suite files: JSON or YAML naming eval sets with their roots and settings."""
from __future__ import annotations

import json
import os

from open_clip_starft.errors import StarftError
from open_clip_starft.eval.sets.classes import SUBSETS
from open_clip_starft.eval.sets.spec import SET_KEYS, EvalSetSpec


def _load_structured(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise StarftError(f"suite {path!r} is YAML but PyYAML is not installed: pip install pyyaml, or write the suite as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise StarftError(f"suite {path!r} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StarftError(f"suite {path!r} is not valid JSON ({e.msg} at line {e.lineno}): fix the file "
                          "(or name it .yaml for YAML)") from None


def load_suite(path: str) -> tuple[list[EvalSetSpec], str | None]:
    """Eval set specs of a JSON/YAML suite file and its ID set name (``id``, optional).

    ``{"id": "imagenet", "sets": {"imagenet": "/data/val", "imagenet-r": {"root": "/data/r"}, ...}}``
    or ``"sets": [{"name": ..., "root": ...}, ...]``; relative roots are relative to the suite file;
    entries take the settings of ``EvalSetSpec`` (``format``, ``classnames``, ``templates``,
    ``subset``, ``subset_labels``, ``split``, ``csv_*_key``, ``group_names``, ``builtin``)."""
    if not os.path.isfile(path):
        raise StarftError(f"--suite {path!r} not found: check the path")
    data = _load_structured(path)
    if not isinstance(data, dict) or "sets" not in data:
        raise StarftError(f"suite {path!r} must be an object with 'sets' (and optionally 'id')")
    unknown = set(data) - {"sets", "id"}
    if unknown:
        raise StarftError(f"suite {path!r}: unknown key {sorted(unknown)[0]!r}: use 'sets' and 'id'")
    raw = data["sets"]
    if isinstance(raw, dict):
        entries = [({"root": v} if isinstance(v, str) else dict(v or {}), k) for k, v in raw.items()]
    elif isinstance(raw, list):
        entries = [(dict(v), v.get("name")) if isinstance(v, dict) else (None, None) for v in raw]
    else:
        raise StarftError(f"suite {path!r}: 'sets' must map names to roots or list entries with name and root")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for entry, name in entries:
        if entry is None or not name:
            raise StarftError(f"suite {path!r}: every set needs a name and a root")
        entry.pop("name", None)
        unknown = set(entry) - SET_KEYS
        if unknown:
            raise StarftError(f"suite {path!r}, set {name!r}: unknown key {sorted(unknown)[0]!r}: use "
                              f"{', '.join(sorted(SET_KEYS - {'name'}))}")
        if "root" not in entry:
            raise StarftError(f"suite {path!r}, set {name!r} has no root: give each set its local folder, shards or CSV")
        root = str(entry.pop("root"))
        if not os.path.isabs(root) and "://" not in root:
            root = os.path.join(base, root)
        for key in ("classnames", "templates", "subset"):
            value = entry.get(key)
            if isinstance(value, str) and value not in ("imagenet", "single", "openai", *SUBSETS) and not os.path.isabs(value) \
                    and os.path.exists(os.path.join(base, value)):
                entry[key] = os.path.join(base, value)
        specs.append(EvalSetSpec(name=str(name), root=root, **entry))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise StarftError(f"suite {path!r} names set {next(n for n in names if names.count(n) > 1)!r} twice: give each a unique name")
    if not specs:
        raise StarftError(f"suite {path!r} has no sets")
    id_name = data.get("id")
    if id_name is not None and id_name not in names:
        raise StarftError(f"suite {path!r}: id {id_name!r} is not one of its sets ({', '.join(names)})")
    return specs, id_name
