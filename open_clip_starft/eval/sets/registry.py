"""Eval-set layouts by name: ``register_layout`` and the detection of a root's layout.

A layout is a function ``list_fn(spec, classnames, class_source) -> Listing`` that reads what is
under ``spec.root`` (``classnames``: the head class names the user gave, or None; the layout then
names the classes itself or says how to), registered with an optional ``detect(spec) -> bool``
tried in ``priority`` order (lower first) when the format is ``auto``. The rest of preparing a set
(subsets, label checks, templates) is the same for every layout (``prepare.prepare_set``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from open_clip_starft.errors import ConfigError
from open_clip_starft.method.registry import Registry
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error


@dataclasses.dataclass
class Listing:
    """What a layout found under a root."""
    classnames: list[str]                       # the head's class names (the user's, or the layout's own)
    class_source: str                           # where they came from, for messages and settings
    items: list[Item] | None = None             # map-style samples, or
    shards: list[str] | None = None             # webdataset shard URLs
    shard_sizes: dict[str, int] | None = None   # samples per shard URL (sizes.json), when known for every shard
    templates: Any = None                       # the layout's own templates (used when the user gave none)
    group_names: list[str] | None = None        # the layout's group names (used when the user gave none)
    folder_classes: list[str] | None = None     # item labels index these folders (mapped by folder_labels)
    class_map: list[list[int]] | None = None    # the layout's own set class → head class ids (ObjectNet)
    set_classnames: list[str] | None = None     # the set's own class names, with class_map
    crop_border: int = 0                        # pixels cropped from every side of every image
    split: str | None = None                    # the split read, for layouts that have splits


ListFn = Callable[[EvalSetSpec, "list[str] | None", "str | None"], Listing]


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    list_fn: ListFn
    detect: Callable[[EvalSetSpec], bool] | None
    priority: int
    pattern_root: bool   # the root may be a shard pattern (not a path that exists)


LAYOUTS: Registry[Layout] = Registry("eval-set format")


def register_layout(name: str, *, detect: Callable[[EvalSetSpec], bool] | None = None, priority: int = 100,
                    pattern_root: bool = False):
    """Register ``list_fn`` as layout ``name`` (the ``format`` of a set)."""
    def deco(fn: ListFn) -> ListFn:
        LAYOUTS.add(name, Layout(name, fn, detect, priority, pattern_root))
        return fn
    return deco


def list_layouts() -> list[str]:
    """Layout names in registration order."""
    return LAYOUTS.names()


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ConfigError(f"unknown eval-set format {name!r}: use one of auto, {', '.join(LAYOUTS)}")
    return LAYOUTS.get(name)


def is_shard_pattern(root: str) -> bool:
    """A brace pattern, a ``.tar``, or ``::``-joined sources: webdataset shards, not a folder."""
    return "{" in root or root.endswith(".tar") or "::" in root


def detect_format(spec: EvalSetSpec) -> str:
    """The layout of ``spec.root``: shard patterns are ``wds``; otherwise the first registered
    detector (by priority) that accepts the root."""
    root = spec.root
    if is_shard_pattern(root):
        return "wds"
    if not os.path.exists(root):
        raise set_error(spec, f"root {root!r} does not exist: give the folder, shard pattern or CSV of the set")
    for layout in sorted((layout for _, layout in LAYOUTS.items()), key=lambda layout: layout.priority):
        if layout.detect is not None and layout.detect(spec):
            return layout.name
    if os.path.isfile(root):
        raise set_error(spec, f"cannot tell the layout of {root!r}: give a folder, a .tar/brace pattern or a .csv/.tsv, or pass --format")
    raise set_error(spec, f"cannot tell the layout of {root!r} (no class subfolders, shards, CSV or known release files): "
                          "check the root or pass --format")
