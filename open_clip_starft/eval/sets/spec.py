"""What an eval set is: the user's spec (``EvalSetSpec``), one image (``Item``) and a set ready to
run (``PreparedSet``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from open_clip_starft.errors import StarftError


@dataclasses.dataclass
class EvalSetSpec:
    """What the user wrote about one eval set (a suite entry, ``--data`` or ``--set``)."""
    name: str
    root: str
    format: str = "auto"
    classnames: Any = None       # "imagenet", a file, a list; None: from the data (folders, classnames.txt)
    templates: Any = None        # "single", "openai", a file, a list; None: the layout's own or "single"
    subset: Any = None           # "imagenet-r", "imagenet-a", a file, a list or "1,2,3" of head class ids
    subset_labels: str = "local"  # labels are subset positions ("local") or head class ids ("full")
    split: str | None = None     # clip_benchmark: a split folder (test); waterbirds: train/val/test (test)
    csv_path_key: str | None = None
    csv_label_key: str | None = None
    csv_group_key: str | None = None
    group_names: Any = None
    builtin: str | None = None


SET_KEYS = frozenset(f.name for f in dataclasses.fields(EvalSetSpec))
"""The settings a suite entry may carry."""


@dataclasses.dataclass
class Item:
    """One image of a map-style set: a path (or an in-memory array), its label and group."""
    ref: Any
    label: int
    group: int = 0


@dataclasses.dataclass
class PreparedSet:
    """An eval set ready to run: head class names and templates, the map from the set's classes to
    head classes, and its samples (a list of items, or shards)."""
    name: str
    format: str
    root: str
    head_classnames: list[str]
    templates: list[str]
    class_map: list[list[int]] | None
    classnames: list[str]                 # the set's own classes (labels index these)
    items: list[Item] | None = None
    shards: list[str] | None = None
    shard_sizes: dict[str, int] | None = None  # samples per shard (sizes.json), when known for every shard
    group_names: list[str] | None = None
    crop_border: int = 0
    label_of: Callable[[int], int | None] | None = None  # wds: raw label → set label (subset_labels full)
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def num_samples(self) -> int | None:
        """Images in the set: the items, or what ``sizes.json`` lists for the shards (None: unknown)."""
        if self.items is not None:
            return len(self.items)
        return sum(self.shard_sizes.values()) if self.shard_sizes is not None else None

    def describe_missing_classes(self) -> str:
        """``"; no image of 3 of its 4 classes: circle, square, triangle"`` when the set holds only some of
        its classes (``settings["classes_without_images"]``), else ``""``."""
        absent = self.settings.get("classes_without_images") or []
        if not absent:
            return ""
        shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        return f"; no image of {len(absent)} of its {self.num_classes} classes: {shown}"

    def group_name(self, group: int) -> str:
        if self.group_names is not None and 0 <= group < len(self.group_names):
            return self.group_names[group]
        return str(group)


def set_error(spec: EvalSetSpec, text: str) -> StarftError:
    """The one-line error about eval set ``spec``: ``eval set 'NAME': TEXT``."""
    return StarftError(f"eval set {spec.name!r}: {text}")
