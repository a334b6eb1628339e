"""Layout ``waterbirds``: the Waterbirds release (``metadata.csv`` with ``img_filename``, ``y``,
``split``, ``place``); group = 2·label + place; split ``test`` by default."""
from __future__ import annotations

import os

from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error

WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_CLASSNAMES = ["landbird", "waterbird"]
WATERBIRDS_GROUP_NAMES = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]


def _has_metadata(spec: EvalSetSpec) -> bool:
    meta = os.path.join(spec.root, "metadata.csv")
    if not os.path.isfile(meta):
        return False
    with open(meta) as f:
        header = f.readline()
    return {"img_filename", "y", "place"} <= set(header.strip().split(","))


@register_layout("waterbirds", detect=_has_metadata, priority=30)
def list_waterbirds(spec: EvalSetSpec, classnames, class_source) -> Listing:
    import pandas as pd
    meta = os.path.join(spec.root, "metadata.csv")
    if not os.path.isfile(meta):
        raise set_error(spec, f"{meta!r} not found: give the Waterbirds release folder (with metadata.csv) as root")
    df = pd.read_csv(meta)
    split = spec.split or "test"
    if split not in WATERBIRDS_SPLITS:
        raise set_error(spec, f"split {split!r}: use train, val or test")
    df = df[df["split"] == WATERBIRDS_SPLITS[split]]
    items = [Item(os.path.join(spec.root, p), int(y), 2 * int(y) + int(place))
             for p, y, place in zip(df["img_filename"], df["y"], df["place"])]
    if classnames is None:
        classnames, class_source = list(WATERBIRDS_CLASSNAMES), "waterbirds"
    return Listing(classnames, class_source, items=items, group_names=list(WATERBIRDS_GROUP_NAMES), split=split)
