"""Layout ``folder``: a folder of class subfolders (torchvision ``ImageFolder``).

Folders are matched to class names by name (``sea_turtle/`` is the class "sea turtle"), by number
when every folder name is an integer (as in ImageNet-V2's release), or by sorted position when every
folder name is a WordNet id (ImageNet: its class names are in sorted WordNet-id order). The listing helpers here (``list_class_folders``, ``folder_labels``,
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


WORDNET_ID = re.compile(r"n\d{8}")
"""ImageNet's class folder names (WordNet ids): OpenCLIP's ImageNet class names are in their sorted order."""


def name_key(name: str) -> str:
    """How a class folder is matched to a class name: ``_`` read as a space, case and surrounding space ignored."""
    return " ".join(name.replace("_", " ").split()).casefold()


def folder_labels(spec: EvalSetSpec, classes: list[str], classnames: list[str], where: str, classes_source: str) -> list[int]:
    """Label of each class folder, an index of ``classnames``:

    - by number when every folder name is an integer (ImageNet-V2's release);
    - by sorted position when every folder name is a WordNet id (ImageNet and its 200-class shifts,
      whose class names are in sorted WordNet-id order; there must be one folder per class name);
    - otherwise by name: each folder is the class whose name it spells (``_`` for a space, any case).
      A folder that names no class is refused (all such folders named); classes without a folder are
      allowed (a set may hold some of the classes), ``missing_classes`` names them.

    Never by sorted position for named folders: ``cross/`` is the class named cross, wherever it sorts."""
    num_classes = len(classnames)
    if all(c.isdigit() for c in classes):
        labels = [int(c) for c in classes]
        bad = [n for n in labels if n >= num_classes]
        if bad:
            raise set_error(spec, f"class folder {bad[0]} of {where!r} is outside the {num_classes} class names "
                                  f"({classes_source}): pass class names that name every class")
        return labels
    if all(WORDNET_ID.fullmatch(c) for c in classes):
        if len(classes) != num_classes:
            raise set_error(spec, f"{where!r} has {len(classes)} WordNet-id class folders but there are {num_classes} "
                                  f"class names ({classes_source}): pass --classnames (or --subset) with one name per "
                                  "class folder, in sorted folder order")
        return list(range(len(classes)))
    index: dict[str, int] = {}
    for i, name in enumerate(classnames):
        index.setdefault(name_key(name), i)
    unknown = [c for c in classes if name_key(c) not in index]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise set_error(spec, f"{len(unknown)} class folder(s) of {where!r} name no class of the {num_classes} class "
                              f"names ({classes_source}): {shown}: name each folder after its class (e.g. "
                              f"{classnames[0].replace(' ', '_')!r}) or pass the class names the folders use")
    labels = [index[name_key(c)] for c in classes]
    twice = [c for c, lab in zip(classes, labels) if labels.count(lab) > 1]
    if twice:
        raise set_error(spec, f"class folders {', '.join(map(repr, twice))} of {where!r} name one class "
                              f"({classnames[labels[classes.index(twice[0])]]!r}): keep one folder per class")
    return labels


def missing_classes(classnames: list[str], labels) -> list[str]:
    """The class names (in class order) that no label in ``labels`` points to."""
    present = set(labels)
    return [name for i, name in enumerate(classnames) if i not in present]


def folder_classnames(classes: list[str]) -> list[str]:
    """Class names from folder names (``_`` read as a space)."""
    return [c.replace("_", " ") for c in classes]


def _has_class_folders(spec: EvalSetSpec) -> bool:
    return os.path.isdir(spec.root) and bool(subdirs(spec.root))


@register_layout("folder", detect=_has_class_folders, priority=80)
def list_folder(spec: EvalSetSpec, classnames, class_source) -> Listing:
    classes, samples = list_class_folders(spec, spec.root)
    if classnames is None:
        if all(WORDNET_ID.fullmatch(c) for c in classes):
            raise set_error(spec, f"the class folders of {spec.root!r} are WordNet ids: pass --classnames imagenet (and "
                                  "--subset for a 200-class set), or a class-names file")
        classnames, class_source = folder_classnames(classes), "the class folder names"
    return Listing(classnames, class_source, items=[Item(p, c, 0) for p, c in samples], folder_classes=classes)
