"""Layout ``csv``: a CSV/TSV with an image path (relative to the file), a label (class id or class
name) and an optional group column. ``csv_items`` also serves ``make-shards``."""
from __future__ import annotations

import os
from typing import Sequence

from open_clip_starft.data.samples import parse_label
from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error

PATH_COLUMNS = ("path", "filepath", "image", "img", "file", "filename", "img_filename")
LABEL_COLUMNS = ("label", "cls", "class", "y", "target")
GROUP_COLUMNS = ("group", "domain")


def _read_csv(spec: EvalSetSpec, path: str):
    import pandas as pd
    sep = "\t" if path.lower().endswith(".tsv") else None
    try:
        return pd.read_csv(path, sep=sep, engine="python" if sep is None else "c")
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds
        raise set_error(spec, f"cannot read {path!r} as CSV ({str(e).splitlines()[0]}): check the file") from None


def _pick(spec: EvalSetSpec, columns, given: str | None, candidates: Sequence[str], what: str, flag: str, path: str,
          required: bool = True):
    """The column named ``given``, else the first of ``candidates`` present."""
    if given is not None:
        if given not in columns:
            raise set_error(spec, f"{path!r} has no column {given!r} (columns: {', '.join(map(str, columns))}): fix {flag}")
        return given
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise set_error(spec, f"{path!r} has no {what} column (looked for {', '.join(candidates)}; columns: "
                              f"{', '.join(map(str, columns))}): name it with {flag}")
    return None


def csv_items(spec: EvalSetSpec, path: str, classnames: list[str] | None):
    """``(items, class names or None, group column or None)`` of a CSV (columns from
    ``spec.csv_*_key`` or the usual names). Labels are class ids, or class names (indexing
    ``classnames``, or the sorted distinct names when it is None); class names come back None
    when the labels are ids and none were given."""
    df = _read_csv(spec, path)
    cols = list(df.columns)
    pkey = _pick(spec, cols, spec.csv_path_key, PATH_COLUMNS, "image path", "--csv-path-key", path)
    lkey = _pick(spec, cols, spec.csv_label_key, LABEL_COLUMNS, "label", "--csv-label-key", path)
    gkey = _pick(spec, cols, spec.csv_group_key, GROUP_COLUMNS, "group", "--csv-group-key", path, required=False)
    base = os.path.dirname(os.path.abspath(path))
    raw = df[lkey].tolist()
    ints = [parse_label(v) if not isinstance(v, str) or v.strip().lstrip("-").isdigit() else None for v in raw]
    if all(v is not None for v in ints):
        labels = ints
    else:
        names = [str(v).strip() for v in raw]
        if classnames is None:
            classnames = sorted(set(names))
        index = {n: i for i, n in enumerate(classnames)}
        missing = [n for n in names if n not in index]
        if missing:
            raise set_error(spec, f"label {missing[0]!r} in {path!r} is not among the class names: use class ids, or class names "
                                  "that match --classnames")
        labels = [index[n] for n in names]
    groups = [0] * len(labels)
    if gkey is not None:
        groups = [parse_label(v) for v in df[gkey].tolist()]
        if any(g is None for g in groups):
            raise set_error(spec, f"column {gkey!r} of {path!r} must hold integer group ids")
    items = [Item(p if os.path.isabs(p) else os.path.join(base, p), lab, g)
             for p, lab, g in zip(map(str, df[pkey].tolist()), labels, groups)]
    return items, classnames, gkey


def _is_table(spec: EvalSetSpec) -> bool:
    return os.path.isfile(spec.root) and spec.root.lower().endswith((".csv", ".tsv"))


@register_layout("csv", detect=_is_table, priority=10)
def list_csv(spec: EvalSetSpec, classnames, class_source) -> Listing:
    items, classnames, _ = csv_items(spec, spec.root, classnames)
    if classnames is None:
        raise set_error(spec, f"the labels of {spec.root!r} are class ids: pass --classnames (imagenet or a file) to name them")
    return Listing(classnames, class_source or "the CSV's label names", items=items)
