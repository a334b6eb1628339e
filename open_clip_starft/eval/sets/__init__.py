"""Evaluation sets: where the images are, their labels and groups, class names, templates and
class subsets; the built-in entries (ImageNet and its shifts, ObjectNet, Waterbirds, PACS,
CIFAR-10.02); suite files.

An eval set is one of these layouts (``format``; ``auto`` detects it from the root), one module
each, registered by name with ``registry.register_layout``:

- ``folder``: a folder of class subfolders (classes in sorted folder order, or by number when
  every folder name is an integer, as in ImageNet-V2's release);
- ``domains``: ``ROOT/DOMAIN/CLASS/image`` (PACS, DomainBed); the domain is the group;
- ``wds``: webdataset shards (a brace pattern, a ``.tar`` or a folder of them) with an image,
  an integer ``cls`` and an optional integer ``group``;
- ``csv`` (``csvfile.py``): a CSV/TSV with an image path (relative to the file), a label (class
  id or class name) and an optional group column;
- ``clip_benchmark``: CLIP_benchmark's webdataset layout (``ROOT/test/{0..n-1}.tar`` with
  ``nshards.txt``, ``classnames.txt``, ``zeroshot_classification_templates.txt`` with ``{c}``);
- ``waterbirds``: the Waterbirds release (``metadata.csv``; group = 2·label + place);
- ``cifar10.02`` (``cifar.py``): CIFAR-10's test batch and CIFAR-10.2's ``cifar102_test.npz``;
  the source is the group;
- ``objectnet``: the ObjectNet release: the 113 classes that map to ImageNet, scored by the
  maximum ImageNet logit of each (as WiSE-FT does); the 2-pixel border of every image is cropped.

Group ids are named by the set's ``group_names`` setting, the layout's own names (Waterbirds, PACS,
CIFAR-10.02), or a ``group_names.txt`` beside the data (one name per line, in id order; e.g. the
class × attribute groups of shards); unnamed groups keep their numbers.

Labels index the set's classes: with a class subset, label ``j`` is the subset's ``j``-th class
(as the sorted WordNet-id folders of ImageNet-R/-A give), or a head class id with
``subset_labels: full``.

Modules: ``spec`` (the dataclasses), ``classes`` (class names, templates, subsets), ``registry``
(layouts by name, format detection), one module per layout, ``builtin`` (built-in entries),
``prepare`` (``prepare_set``), ``suite`` (suite files), ``dataset`` (batches of images).
"""
from __future__ import annotations

from open_clip_starft.eval.sets.spec import SET_KEYS, EvalSetSpec, Item, PreparedSet, set_error
from open_clip_starft.eval.sets.registry import Listing, detect_format, get_layout, list_layouts, register_layout
# the layouts, in the order --format lists them
from open_clip_starft.eval.sets.folder import folder_classnames, folder_labels, is_image, list_class_folders
from open_clip_starft.eval.sets import domains  # noqa: F401 - registers the layout
from open_clip_starft.eval.sets.wds import shard_urls
from open_clip_starft.eval.sets.csvfile import csv_items
from open_clip_starft.eval.sets import clip_benchmark  # noqa: F401 - registers the layout
from open_clip_starft.eval.sets.waterbirds import WATERBIRDS_SPLITS
from open_clip_starft.eval.sets.cifar import CIFAR10_CLASSNAMES
from open_clip_starft.eval.sets.objectnet import OBJECTNET_BORDER
from open_clip_starft.eval.sets.builtin import BUILTIN_SETS, apply_builtin
from open_clip_starft.eval.sets.classes import (SUBSETS, builtin_subset, load_subset, parse_subset_text,
                                                resolve_classnames, resolve_templates)
from open_clip_starft.eval.sets.prepare import prepare_set
from open_clip_starft.eval.sets.suite import load_suite

FORMATS = ("auto", *list_layouts())
"""The ``format`` values: ``auto`` and every registered layout."""

__all__ = [
    "BUILTIN_SETS", "CIFAR10_CLASSNAMES", "FORMATS", "OBJECTNET_BORDER", "SET_KEYS", "SUBSETS", "WATERBIRDS_SPLITS",
    "EvalSetSpec", "Item", "ItemDataset", "Listing", "PreparedSet",
    "apply_builtin", "batches", "builtin_subset", "collate", "csv_items", "detect_format", "folder_classnames",
    "folder_labels", "get_layout", "is_image", "list_class_folders", "list_layouts", "load_subset", "load_suite",
    "open_image", "parse_subset_text", "prepare_set", "register_layout", "resolve_classnames", "resolve_templates",
    "set_error", "shard_urls",
]


# ``dataset`` (torch's Dataset and collation) is imported on first use of its names, so that a command's
# parser can list the formats and built-in sets without importing torch.
_DATASET_NAMES = ("ItemDataset", "batches", "collate", "open_image")


def __getattr__(name: str):
    if name in _DATASET_NAMES:
        from open_clip_starft.eval.sets import dataset
        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
