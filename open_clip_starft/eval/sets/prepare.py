"""Preparing an eval set: the layout lists the samples, then the same steps for every layout
(class subset, label checks, templates, the settings recorded with the results)."""
from __future__ import annotations

import os

from open_clip_starft.errors import StarftError
from open_clip_starft.eval.sets.builtin import apply_builtin
from open_clip_starft.eval.sets.classes import load_subset, resolve_classnames, resolve_templates
from open_clip_starft.eval.sets.folder import folder_labels, missing_classes
from open_clip_starft.eval.sets.registry import detect_format, get_layout, list_layouts
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, PreparedSet, set_error
from open_clip_starft.method.descriptors import read_lines_or_json_list


def _layout_of(spec: EvalSetSpec):
    """``(format name, layout)`` of ``spec``, its root checked."""
    if spec.format != "auto" and spec.format not in list_layouts():
        raise set_error(spec, f"unknown format {spec.format!r}: use one of auto, {', '.join(list_layouts())}")
    if spec.subset_labels not in ("local", "full"):
        raise set_error(spec, f"subset_labels {spec.subset_labels!r}: use local or full")
    fmt = detect_format(spec) if spec.format == "auto" else spec.format
    layout = get_layout(fmt)
    if not layout.pattern_root and not os.path.exists(spec.root):
        raise set_error(spec, f"root {spec.root!r} does not exist: give the folder, shard pattern or CSV of the set")
    return fmt, layout


def _checked_items(spec: EvalSetSpec, items: list[Item], label_of, num_classes: int, class_source: str,
                   restricted: bool) -> list[Item]:
    """``items`` with labels mapped through ``label_of`` (subset_labels full), every label checked."""
    if label_of is not None:
        mapped = [label_of(it.label) for it in items]
        if any(m is None for m in mapped):
            bad = next(it.label for it, m in zip(items, mapped) if m is None)
            raise set_error(spec, f"label {bad} is not in the class subset: with subset_labels full every label must be a subset class id")
        items = [Item(it.ref, m, it.group) for it, m in zip(items, mapped)]
    bad = [it.label for it in items if not 0 <= it.label < num_classes]
    if bad:
        raise set_error(spec, f"label {bad[0]} is outside the {num_classes} class names ({class_source}"
                              f"{', restricted to the subset' if restricted else ''}): "
                              "pass class names (or a subset) that name every label")
    if not items:
        raise set_error(spec, f"{spec.root!r} holds no images")
    return items


def _settings(spec: EvalSetSpec, fmt: str, found, class_source: str, num_classes: int, templates: list[str],
              templates_source: str, class_map, set_names) -> dict:
    """What the results record about the set."""
    settings = {
        "format": fmt, "root": spec.root, "classnames": class_source, "num_classes": num_classes,
        "templates": templates_source, "num_templates": len(templates),
        "subset": (spec.subset if isinstance(spec.subset, str) else (f"{len(class_map)} classes" if class_map else None))
        if set_names is None else f"objectnet map ({len(class_map)} classes)",
    }
    if spec.builtin:
        settings["builtin"] = spec.builtin
    if found.split or spec.split:
        settings["split"] = found.split or spec.split
    return settings


GROUP_NAMES_FILE = "group_names.txt"
"""Names of a set's group ids, one per line in id order (``circle on water``, …), beside its data: the root
folder, or the folder of its CSV or shards; used when neither the set's settings nor its layout name them."""


def _group_names_beside(spec: EvalSetSpec, found) -> list[str] | None:
    """The names in ``GROUP_NAMES_FILE`` beside the set's data, or None when there is none."""
    if os.path.isdir(spec.root):
        folder = spec.root
    elif found.shards:
        folder = os.path.dirname(found.shards[0])
    else:
        folder = os.path.dirname(os.path.abspath(spec.root))
    path = os.path.join(folder, GROUP_NAMES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        names = read_lines_or_json_list(path, "group-names file", comments=False, blank_lines="refuse")
    except StarftError as e:
        raise set_error(spec, str(e)) from None
    return names or None


def prepare_set(spec: EvalSetSpec) -> PreparedSet:
    """Check and list an eval set: its layout, class names, templates, class map and samples.
    Every problem is a one-line StarftError naming the set and the input."""
    spec = apply_builtin(spec)
    fmt, layout = _layout_of(spec)
    given, given_source = resolve_classnames(spec.classnames) if spec.classnames is not None else (None, None)
    found = layout.list_fn(spec, given, given_source)
    head_names, class_source, items = found.classnames, found.class_source, found.items
    set_names, class_map = found.set_classnames, found.class_map
    if class_map is None:
        subset = load_subset(spec.subset, len(head_names), where=f"eval set {spec.name!r}: subset")
        class_map = [[i] for i in subset] if subset is not None else None
    set_classnames = set_names or ([head_names[ids[0]] for ids in class_map] if class_map else list(head_names))
    num_classes = len(set_classnames)

    label_of = None
    if spec.subset_labels == "full" and class_map is not None and set_names is None:
        label_of = {ids[0]: j for j, ids in enumerate(class_map)}.get
    if found.folder_classes is not None:
        labels = folder_labels(spec, found.folder_classes, list(head_names) if label_of else set_classnames, spec.root,
                               class_source)
        items = [Item(it.ref, labels[it.label], it.group) for it in items]
    if items is not None:
        items = _checked_items(spec, items, label_of, num_classes, class_source, bool(class_map and not set_names))

    template_spec = spec.templates if spec.templates is not None else found.templates
    templates, templates_source = resolve_templates(template_spec if template_spec is not None else "single")
    settings = _settings(spec, fmt, found, class_source, num_classes, templates, templates_source, class_map, set_names)
    if items is not None:
        absent = missing_classes(set_classnames, (it.label for it in items))
        if absent:  # a set may hold some of the classes: said, and scored over the classes it holds
            settings["classes_without_images"] = absent
    return PreparedSet(
        name=spec.name, format=fmt, root=spec.root, head_classnames=list(head_names), templates=templates,
        class_map=class_map, classnames=set_classnames, items=items, shards=found.shards,
        shard_sizes=found.shard_sizes, crop_border=found.crop_border, label_of=label_of,
        group_names=list(spec.group_names) if spec.group_names is not None else
        (found.group_names if found.group_names is not None else _group_names_beside(spec, found)),
        settings=settings)
