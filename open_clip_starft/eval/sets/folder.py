"""Layout ``folder``: a folder of class subfolders (torchvision ``ImageFolder``).

Classes are in sorted folder order, or by number when every folder name is an integer (as in
ImageNet-V2's release). The listing helpers here (``list_class_folders``, ``folder_labels``,
``folder_classnames``) also serve ``domains`` and ``make-shards``.
"""
from __future__ import annotations

import os
import re

from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image(name: str) -> bool:
    """Whether a file name has an image suffix (case-insensitive)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def subdirs(path: str) -> list[str]:
    """Sorted names of the visible subfolders of ``path``."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def list_class_folders(spec: EvalSetSpec, root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class folder names sorted, [(image path, folder index)])`` of a class-subfolder tree."""
    from torchvision.datasets import ImageFolder
    try:
        folder = ImageFolder(root, allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise set_error(spec, f"cannot read the class folders of {root!r} ({e}): check the root") from None
    if not folder.classes:
        raise set_error(spec, f"{root!r} has no class subfolders: give a folder of class subfolders")
    return folder.classes, folder.samples


def folder_labels(spec: EvalSetSpec, classes: list[str], num_classes: int, where: str, classes_source: str) -> list[int]:
    """Label of each class folder: by number when every name is an integer, else by sorted position
    (then there must be exactly ``num_classes`` folders)."""
    if all(c.isdigit() for c in classes):
        labels = [int(c) for c in classes]
        bad = [n for n in labels if n >= num_classes]
        if bad:
            raise set_error(spec, f"class folder {bad[0]} of {where!r} is outside the {num_classes} class names "
                                  f"({classes_source}): pass class names that name every class")
        return labels
    if len(classes) != num_classes:
        raise set_error(spec, f"{where!r} has {len(classes)} class folders but there are {num_classes} class names "
                              f"({classes_source}): pass --classnames (or --subset) with one name per class folder, in sorted folder order")
    return list(range(len(classes)))


def folder_classnames(classes: list[str]) -> list[str]:
    """Class names from folder names (``_`` read as a space)."""
    return [c.replace("_", " ") for c in classes]


def _has_class_folders(spec: EvalSetSpec) -> bool:
    return os.path.isdir(spec.root) and bool(subdirs(spec.root))


@register_layout("folder", detect=_has_class_folders, priority=80)
def list_folder(spec: EvalSetSpec, classnames, class_source) -> Listing:
    classes, samples = list_class_folders(spec, spec.root)
    if classnames is None:
        if all(re.fullmatch(r"n\d{8}", c) for c in classes):
            raise set_error(spec, f"the class folders of {spec.root!r} are WordNet ids: pass --classnames imagenet (and "
                                  "--subset for a 200-class set), or a class-names file")
        classnames, class_source = folder_classnames(classes), "the class folder names"
    return Listing(classnames, class_source, items=[Item(p, c, 0) for p, c in samples], folder_classes=classes)
