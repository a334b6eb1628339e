"""Layout ``domains``: ``ROOT/DOMAIN/CLASS/image`` (PACS, DomainBed); the domain is the group.

Detected when the root holds at least two folders, no images beside them, and the same non-empty
list of class folders in each.
"""
from __future__ import annotations

import os

from open_clip_starft.eval.sets.folder import folder_classnames, is_image, list_class_folders, subdirs
from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error


def looks_like_domains(spec: EvalSetSpec) -> bool:
    root = spec.root
    if not os.path.isdir(root):
        return False
    tops = subdirs(root)
    if len(tops) < 2:
        return False
    inner = []
    for top in tops:
        path = os.path.join(root, top)
        if any(is_image(e.name) for e in os.scandir(path) if e.is_file()):
            return False
        inner.append(tuple(subdirs(path)))
    return bool(inner[0]) and all(names == inner[0] for names in inner)


@register_layout("domains", detect=looks_like_domains, priority=70)
def list_domains(spec: EvalSetSpec, classnames, class_source) -> Listing:
    domains = subdirs(spec.root)
    if not domains:
        raise set_error(spec, f"{spec.root!r} has no domain folders: give ROOT/DOMAIN/CLASS/image")
    items, classes = [], None
    for g, domain in enumerate(domains):
        found, samples = list_class_folders(spec, os.path.join(spec.root, domain))
        if classes is not None and found != classes:
            raise set_error(spec, f"domain {domain!r} has other class folders than {domains[0]!r}: every domain needs the same classes")
        classes = found
        items += [Item(p, c, g) for p, c in samples]
    if classnames is None:
        classnames, class_source = folder_classnames(classes), "the class folder names"
    return Listing(classnames, class_source, items=items, group_names=domains, folder_classes=classes)
