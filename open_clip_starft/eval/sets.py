"""Evaluation sets: where the images are, their labels and groups, class names, templates and
class subsets; the built-in entries (ImageNet and its shifts, ObjectNet, Waterbirds, PACS,
CIFAR-10.02); suite files.

An eval set is one of these layouts (``format``; ``auto`` detects it from the root):

- ``folder``: a folder of class subfolders (torchvision ``ImageFolder``; classes in sorted folder
  order, or by number when every folder name is an integer, as in ImageNet-V2's release);
- ``domains``: ``ROOT/DOMAIN/CLASS/image`` (PACS, DomainBed); the domain is the group;
- ``wds``: webdataset shards (a brace pattern, a ``.tar`` or a folder of them) with an image,
  an integer ``cls`` and an optional integer ``group``;
- ``csv``: a CSV/TSV with an image path (relative to the file), a label (class id or class
  name) and an optional group column;
- ``clip_benchmark``: CLIP_benchmark's webdataset layout (``ROOT/test/{0..n-1}.tar`` with
  ``nshards.txt``, ``ROOT/classnames.txt``, ``ROOT/zeroshot_classification_templates.txt`` with
  ``{c}``), as in the ``clip-benchmark/wds_*`` sets;
- ``waterbirds``: the Waterbirds release (``metadata.csv``; group = 2·label + place);
- ``cifar10.02``: CIFAR-10's test batch (``cifar-10-batches-py/test_batch``) and CIFAR-10.2's
  ``cifar102_test.npz``; the source is the group;
- ``objectnet``: the ObjectNet release (``images/`` and ``mappings/``): the 113 classes that map
  to ImageNet, scored by the maximum ImageNet logit of each (as WiSE-FT does); the 2-pixel border
  of every image is cropped.

Labels index the set's classes: with a class subset, label ``j`` is the subset's ``j``-th class
(as the sorted WordNet-id folders of ImageNet-R/-A give), or a head class id with
``subset_labels: full``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
from importlib import resources
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from open_clip_starft.method.captions import load_classnames, load_templates
from open_clip_starft.data.samples import IMAGE_KEYS, parse_label
from open_clip_starft.errors import StarftError

FORMATS = ("auto", "folder", "domains", "wds", "csv", "clip_benchmark", "waterbirds", "cifar10.02", "objectnet")
SUBSETS = ("imagenet-r", "imagenet-a")
CIFAR10_CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
OBJECTNET_BORDER = 2

BUILTIN_SETS: dict[str, dict[str, Any]] = {
    "imagenet": {"classnames": "imagenet", "templates": "openai"},
    "imagenet-v2": {"classnames": "imagenet", "templates": "openai"},
    "imagenet-r": {"classnames": "imagenet", "templates": "openai", "subset": "imagenet-r"},
    "imagenet-a": {"classnames": "imagenet", "templates": "openai", "subset": "imagenet-a"},
    "imagenet-sketch": {"classnames": "imagenet", "templates": "openai"},
    "objectnet": {"format": "objectnet", "classnames": "imagenet", "templates": "openai"},
    "waterbirds": {"format": "waterbirds", "classnames": ["landbird", "waterbird"], "templates": "single",
                   "group_names": ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]},
    "pacs": {"format": "domains", "templates": "single"},
    "cifar10.02": {"format": "cifar10.02", "classnames": CIFAR10_CLASSNAMES, "templates": "single",
                   "group_names": ["cifar10", "cifar10.2"]},
}
"""Built-in suite entries: a set named like one of these (or with ``builtin: NAME``) takes these
settings; only the root is needed."""

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


_SET_KEYS = {f.name for f in dataclasses.fields(EvalSetSpec)}


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
    group_names: list[str] | None = None
    crop_border: int = 0
    label_of: Callable[[int], int | None] | None = None  # wds: raw label → set label (subset_labels full)
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def group_name(self, group: int) -> str:
        if self.group_names is not None and 0 <= group < len(self.group_names):
            return self.group_names[group]
        return str(group)


def _err(spec: EvalSetSpec, text: str) -> StarftError:
    return StarftError(f"eval set {spec.name!r}: {text}")


# -- class subsets ----------------------------------------------------------------------------
def builtin_subset(name: str) -> list[int]:
    """The 200 ImageNet class ids of ``imagenet-r`` or ``imagenet-a`` (shipped as text files)."""
    ref = resources.files("open_clip_starft.eval").joinpath("class_subsets").joinpath(name.replace("-", "_") + ".txt")
    return _parse_subset_text(ref.read_text(encoding="utf-8"), name)


def _parse_subset_text(text: str, where: str) -> list[int]:
    ids = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ids.append(int(line.split()[0]))
        except ValueError:
            raise StarftError(f"class subset {where!r}, line {lineno}: {line.split()[0]!r} is not a class id: "
                              "write one integer class id per line") from None
    return ids


def load_subset(spec, num_head_classes: int, where: str = "--subset") -> list[int] | None:
    """Head class ids of a subset spec: a built-in name, a file (one id per line), a list, or
    ``"1,2,3"``. Ids must be unique and within the head's class names."""
    if spec is None or spec == "" or spec == "none":
        return None
    if isinstance(spec, (list, tuple)):
        try:
            ids = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise StarftError(f"{where}: the subset list must hold integer class ids") from None
        source = "the list"
    elif spec in SUBSETS:
        ids, source = builtin_subset(spec), spec
    elif re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", str(spec)):
        ids, source = [int(i) for i in str(spec).split(",")], "the list"
    else:
        if not os.path.isfile(spec):
            raise StarftError(f"{where} {spec!r}: no such file: name imagenet-r, imagenet-a, a file of class ids "
                              "(one per line) or a comma list")
        with open(spec, encoding="utf-8") as f:
            ids, source = _parse_subset_text(f.read(), spec), spec
    if not ids:
        raise StarftError(f"{where} {spec!r} is empty: list at least one class id")
    bad = [i for i in ids if not 0 <= i < num_head_classes]
    if bad:
        raise StarftError(f"{where}: class id {bad[0]} of {source} is out of range for the {num_head_classes} "
                          f"class names (0..{num_head_classes - 1}): fix the subset or pass the class names it indexes")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise StarftError(f"{where}: class id {dup} appears twice in {source}: list each class once")
    return ids


# -- class names and templates ----------------------------------------------------------------
def resolve_classnames(spec) -> tuple[list[str], str]:
    """(names, description) for ``imagenet``, a file, or a list."""
    if isinstance(spec, (list, tuple)):
        return [str(n) for n in spec], f"{len(spec)} names"
    return load_classnames(spec), spec


def _template_file(path: str) -> list[str]:
    """A templates file with ``{}`` or CLIP_benchmark's ``{c}`` placeholders, one per line."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    templates = [t.replace("{c}", "{}") for t in lines]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise StarftError(f"templates file {path!r}: " + (f"template {bad[0]!r} needs exactly one '{{c}}' or '{{}}' "
                          "where the class name goes" if bad else "has no templates"))
    return templates


def resolve_templates(spec) -> tuple[list[str], str]:
    if isinstance(spec, (list, tuple)):
        templates = [str(t).replace("{c}", "{}") for t in spec]
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise StarftError("templates: each template needs exactly one '{}' where the class name goes")
        return templates, f"{len(templates)} templates"
    if spec in ("single", "openai"):
        return load_templates(spec), spec
    if not os.path.isfile(str(spec)):
        raise StarftError(f"--templates {spec!r}: use single, openai or a file of templates (one per line)")
    try:
        return load_templates(spec), spec
    except StarftError:
        return _template_file(spec), spec  # CLIP_benchmark's {c} placeholders


# -- format detection -------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return name.lower().endswith((".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"))


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _looks_like_domains(root: str) -> bool:
    tops = _subdirs(root)
    if len(tops) < 2:
        return False
    inner = []
    for top in tops:
        path = os.path.join(root, top)
        if any(_is_image(e.name) for e in os.scandir(path) if e.is_file()):
            return False
        inner.append(tuple(_subdirs(path)))
    return bool(inner[0]) and all(names == inner[0] for names in inner)


def _is_shard_pattern(root: str) -> bool:
    return "{" in root or root.endswith(".tar") or "::" in root


def detect_format(spec: EvalSetSpec) -> str:
    root = spec.root
    if _is_shard_pattern(root):
        return "wds"
    if not os.path.exists(root):
        raise _err(spec, f"root {root!r} does not exist: give the folder, shard pattern or CSV of the set")
    if os.path.isfile(root):
        if root.lower().endswith((".csv", ".tsv")):
            return "csv"
        raise _err(spec, f"cannot tell the layout of {root!r}: give a folder, a .tar/brace pattern or a .csv/.tsv, or pass --format")
    split = spec.split or "test"
    if os.path.isfile(os.path.join(root, split, "nshards.txt")):
        return "clip_benchmark"
    if os.path.isfile(os.path.join(root, "metadata.csv")):
        with open(os.path.join(root, "metadata.csv")) as f:
            header = f.readline()
        if {"img_filename", "y", "place"} <= set(header.strip().split(",")):
            return "waterbirds"
    if os.path.isfile(os.path.join(root, "cifar102_test.npz")):
        return "cifar10.02"
    if os.path.isfile(os.path.join(root, "mappings", "objectnet_to_imagenet_1k.json")):
        return "objectnet"
    if any(name.endswith(".tar") for name in os.listdir(root)):
        return "wds"
    if _looks_like_domains(root):
        return "domains"
    if _subdirs(root):
        return "folder"
    raise _err(spec, f"cannot tell the layout of {root!r} (no class subfolders, shards, CSV or known release files): "
                     "check the root or pass --format")


# -- the layouts ------------------------------------------------------------------------------
def _image_folder(spec: EvalSetSpec, root: str) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder
    try:
        folder = ImageFolder(root, allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise _err(spec, f"cannot read the class folders of {root!r} ({e}): check the root") from None
    if not folder.classes:
        raise _err(spec, f"{root!r} has no class subfolders: give a folder of class subfolders")
    return folder.classes, folder.samples


def _folder_labels(spec: EvalSetSpec, classes: list[str], num_classes: int, where: str, classes_source: str):
    """Set label of each class folder: by number when every name is an integer, else by sorted position."""
    if all(c.isdigit() for c in classes):
        labels = [int(c) for c in classes]
        bad = [n for n in labels if n >= num_classes]
        if bad:
            raise _err(spec, f"class folder {bad[0]} of {where!r} is outside the {num_classes} class names "
                             f"({classes_source}): pass class names that name every class")
        return labels
    if len(classes) != num_classes:
        raise _err(spec, f"{where!r} has {len(classes)} class folders but there are {num_classes} class names "
                         f"({classes_source}): pass --classnames (or --subset) with one name per class folder, in sorted folder order")
    return list(range(len(classes)))


def _folder_names(classes: list[str]) -> list[str]:
    return [c.replace("_", " ") for c in classes]


def _read_csv(spec: EvalSetSpec, path: str):
    import pandas as pd
    sep = "\t" if path.lower().endswith(".tsv") else None
    try:
        return pd.read_csv(path, sep=sep, engine="python" if sep is None else "c")
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds
        raise _err(spec, f"cannot read {path!r} as CSV ({str(e).splitlines()[0]}): check the file") from None


def _pick(spec: EvalSetSpec, columns, given: str | None, candidates: Sequence[str], what: str, flag: str, path: str,
          required: bool = True):
    if given is not None:
        if given not in columns:
            raise _err(spec, f"{path!r} has no column {given!r} (columns: {', '.join(map(str, columns))}): fix {flag}")
        return given
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise _err(spec, f"{path!r} has no {what} column (looked for {', '.join(candidates)}; columns: "
                         f"{', '.join(map(str, columns))}): name it with {flag}")
    return None


def _csv_items(spec, path, classnames):
    """``(items, class names, group column or None)`` of a CSV; labels are class ids or class names."""
    df = _read_csv(spec, path)
    cols = list(df.columns)
    pkey = _pick(spec, cols, spec.csv_path_key, ("path", "filepath", "image", "img", "file", "filename", "img_filename"),
                 "image path", "--csv-path-key", path)
    lkey = _pick(spec, cols, spec.csv_label_key, ("label", "cls", "class", "y", "target"), "label", "--csv-label-key", path)
    gkey = _pick(spec, cols, spec.csv_group_key, ("group", "domain"), "group", "--csv-group-key", path, required=False)
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
            raise _err(spec, f"label {missing[0]!r} in {path!r} is not among the class names: use class ids, or class names "
                             "that match --classnames")
        labels = [index[n] for n in names]
    groups = [0] * len(labels)
    if gkey is not None:
        groups = [parse_label(v) for v in df[gkey].tolist()]
        if any(g is None for g in groups):
            raise _err(spec, f"column {gkey!r} of {path!r} must hold integer group ids")
    items = [Item(p if os.path.isabs(p) else os.path.join(base, p), lab, g)
             for p, lab, g in zip(map(str, df[pkey].tolist()), labels, groups)]
    return items, classnames, gkey


def _shard_urls(spec: EvalSetSpec, root: str) -> list[str]:
    from open_clip_train.data import expand_urls
    if os.path.isdir(root):
        urls = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".tar"))
    else:
        urls, _ = expand_urls(root)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if not urls or (local and len(missing) == len(local)):
        raise _err(spec, f"root {root!r} does not exist (no shard found{', first: ' + repr(missing[0]) if missing else ''}): "
                         "check the path and the brace pattern")
    if missing:
        raise _err(spec, f"{len(missing)} of {len(local)} shards of {root!r} do not exist (first: {missing[0]!r}): fix the pattern")
    return urls


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _cifar_items(spec: EvalSetSpec, root: str) -> list[Item]:
    import numpy as np
    batch = os.path.join(root, "cifar-10-batches-py", "test_batch")
    npz = os.path.join(root, "cifar102_test.npz")
    for path in (batch, npz):
        if not os.path.isfile(path):
            raise _err(spec, f"{path!r} not found: CIFAR-10.02 needs CIFAR-10's cifar-10-batches-py/test_batch and "
                             "CIFAR-10.2's cifar102_test.npz under the root")
    with open(batch, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    images10 = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    with np.load(npz) as z:
        images102, labels102 = z["images"], z["labels"]
    items = [Item(img, int(lab), 0) for img, lab in zip(images10, d["labels"])]
    items += [Item(img, int(lab), 1) for img, lab in zip(images102, labels102)]
    return items


def _objectnet(spec: EvalSetSpec, root: str, head_names: list[str]):
    """Class map (ObjectNet class → ImageNet ids), class names and items of the ObjectNet release
    (the mapping logic of WiSE-FT / CLIP_benchmark)."""
    maps = os.path.join(root, "mappings")
    try:
        with open(os.path.join(maps, "folder_to_objectnet_label.json")) as f:
            label_to_folder = {v: k for k, v in json.load(f).items()}
        with open(os.path.join(maps, "objectnet_to_imagenet_1k.json")) as f:
            objectnet_to_imagenet = json.load(f)
        with open(os.path.join(maps, "pytorch_to_imagenet_2012_id.json")) as f:
            id_2012_to_pytorch = {v: int(k) for k, v in json.load(f).items()}
        with open(os.path.join(maps, "imagenet_to_label_2012_v2")) as f:
            name_to_index = {line.strip(): id_2012_to_pytorch[i] for i, line in enumerate(f)}
    except (OSError, KeyError, ValueError) as e:
        raise _err(spec, f"cannot read ObjectNet's mappings under {maps!r} ({e}): give the objectnet-1.0 folder as root") from None
    folder_to_ids = {}
    for objectnet_name, imagenet_names in objectnet_to_imagenet.items():
        folder_to_ids[label_to_folder[objectnet_name]] = [int(name_to_index[n]) for n in imagenet_names.split("; ")]
    folders = sorted(folder_to_ids)
    bad = [i for ids in folder_to_ids.values() for i in ids if i >= len(head_names)]
    if bad:
        raise _err(spec, f"ObjectNet maps to ImageNet class {bad[0]}, outside the {len(head_names)} class names: use --classnames imagenet")
    images = os.path.join(root, "images")
    items = []
    for label, folder in enumerate(folders):
        path = os.path.join(images, folder)
        if os.path.isdir(path):
            items += [Item(os.path.join(path, n), label) for n in sorted(os.listdir(path)) if _is_image(n)]
    names = {v: k for k, v in label_to_folder.items()}
    return [folder_to_ids[f] for f in folders], [names[f].lower() for f in folders], items


# -- preparing a set --------------------------------------------------------------------------
def apply_builtin(spec: EvalSetSpec) -> EvalSetSpec:
    """Fill the settings the user left unset from the built-in entry of ``spec.builtin`` or ``spec.name``."""
    key = spec.builtin or (spec.name if spec.name in BUILTIN_SETS else None)
    if key is None:
        return spec
    if key not in BUILTIN_SETS:
        raise _err(spec, f"unknown built-in set {key!r}: use one of {', '.join(BUILTIN_SETS)}")
    values = {k: v for k, v in BUILTIN_SETS[key].items()
              if getattr(spec, k) in (None, "auto") or (k == "format" and spec.format == "auto")}
    return dataclasses.replace(spec, builtin=key, **values)


def prepare_set(spec: EvalSetSpec) -> PreparedSet:
    """Check and list an eval set: its layout, class names, templates, class map and samples.
    Every problem is a one-line StarftError naming the set and the input."""
    spec = apply_builtin(spec)
    if spec.format not in FORMATS:
        raise _err(spec, f"unknown format {spec.format!r}: use one of {', '.join(FORMATS)}")
    if spec.subset_labels not in ("local", "full"):
        raise _err(spec, f"subset_labels {spec.subset_labels!r}: use local or full")
    fmt = detect_format(spec) if spec.format == "auto" else spec.format
    root = spec.root
    if fmt not in ("wds",) and not os.path.exists(root):
        raise _err(spec, f"root {root!r} does not exist: give the folder, shard pattern or CSV of the set")

    head_names, class_source = (resolve_classnames(spec.classnames) if spec.classnames is not None else (None, None))
    template_spec = spec.templates
    items = shards = None
    group_names = list(spec.group_names) if spec.group_names is not None else None
    crop_border = 0
    set_names = None  # when the layout names its classes itself (ObjectNet)
    class_map = None

    if fmt == "clip_benchmark":
        split = spec.split or "test"
        nfile = os.path.join(root, split, "nshards.txt")
        if not os.path.isfile(nfile):
            raise _err(spec, f"{nfile!r} not found: a CLIP_benchmark set has ROOT/{split}/nshards.txt and ROOT/{split}/0.tar ...")
        kind_file = os.path.join(root, "dataset_type.txt")
        if os.path.isfile(kind_file) and open(kind_file).read().strip().lower() not in ("", "classification"):
            raise _err(spec, f"{root!r} is a {open(kind_file).read().strip()} set: only classification sets are evaluated")
        n = int(open(nfile).read().strip())
        shards = _shard_urls(spec, os.path.join(root, split, "{0..%d}.tar" % (n - 1)) if n > 1 else os.path.join(root, split, "0.tar"))
        if head_names is None:
            cfile = os.path.join(root, "classnames.txt")
            if not os.path.isfile(cfile):
                raise _err(spec, f"{cfile!r} not found: pass --classnames")
            head_names, class_source = _read_lines(cfile), cfile
        tfile = os.path.join(root, "zeroshot_classification_templates.txt")
        if template_spec is None and os.path.isfile(tfile):
            template_spec = tfile
    elif fmt == "wds":
        shards = _shard_urls(spec, root)
        if head_names is None:
            cfile = os.path.join(root if os.path.isdir(root) else os.path.dirname(shards[0]), "classnames.txt")
            if not os.path.isfile(cfile):
                raise _err(spec, f"no class names for the shards of {root!r}: pass --classnames (or put classnames.txt beside the shards)")
            head_names, class_source = _read_lines(cfile), cfile
    elif fmt == "csv":
        items, head_names, _ = _csv_items(spec, root, head_names)
        if head_names is None:
            raise _err(spec, f"the labels of {root!r} are class ids: pass --classnames (imagenet or a file) to name them")
        class_source = class_source or "the CSV's label names"
    elif fmt == "waterbirds":
        import pandas as pd
        meta = os.path.join(root, "metadata.csv")
        if not os.path.isfile(meta):
            raise _err(spec, f"{meta!r} not found: give the Waterbirds release folder (with metadata.csv) as root")
        df = pd.read_csv(meta)
        split = spec.split or "test"
        if split not in WATERBIRDS_SPLITS:
            raise _err(spec, f"split {split!r}: use train, val or test")
        df = df[df["split"] == WATERBIRDS_SPLITS[split]]
        items = [Item(os.path.join(root, p), int(y), 2 * int(y) + int(place))
                 for p, y, place in zip(df["img_filename"], df["y"], df["place"])]
        if head_names is None:
            head_names, class_source = ["landbird", "waterbird"], "waterbirds"
        if group_names is None:
            group_names = BUILTIN_SETS["waterbirds"]["group_names"]
    elif fmt == "cifar10.02":
        items = _cifar_items(spec, root)
        if head_names is None:
            head_names, class_source = list(CIFAR10_CLASSNAMES), "cifar10"
        if group_names is None:
            group_names = ["cifar10", "cifar10.2"]
    elif fmt == "objectnet":
        if head_names is None:
            head_names, class_source = load_classnames("imagenet"), "imagenet"
        class_map, set_names, items = _objectnet(spec, root, head_names)
        crop_border = OBJECTNET_BORDER
    elif fmt == "domains":
        domains = _subdirs(root)
        items, classes = [], None
        for g, domain in enumerate(domains):
            found, samples = _image_folder(spec, os.path.join(root, domain))
            if classes is not None and found != classes:
                raise _err(spec, f"domain {domain!r} has other class folders than {domains[0]!r}: every domain needs the same classes")
            classes = found
            items += [Item(p, c, g) for p, c in samples]
        if head_names is None:
            head_names, class_source = _folder_names(classes), "the class folder names"
        if group_names is None:
            group_names = domains
        folder_classes = classes
    elif fmt == "folder":
        folder_classes, samples = _image_folder(spec, root)
        if head_names is None:
            if all(re.fullmatch(r"n\d{8}", c) for c in folder_classes):
                raise _err(spec, f"the class folders of {root!r} are WordNet ids: pass --classnames imagenet (and "
                                 "--subset for a 200-class set), or a class-names file")
            head_names, class_source = _folder_names(folder_classes), "the class folder names"
        items = [Item(p, c, 0) for p, c in samples]

    if class_map is None:
        subset = load_subset(spec.subset, len(head_names), where=f"eval set {spec.name!r}: subset")
        class_map = [[i] for i in subset] if subset is not None else None
    set_classnames = set_names or ([head_names[ids[0]] for ids in class_map] if class_map else list(head_names))
    num_classes = len(set_classnames)

    label_of = None
    if spec.subset_labels == "full" and class_map is not None and set_names is None:
        position = {ids[0]: j for j, ids in enumerate(class_map)}
        label_of = position.get
    if fmt in ("folder", "domains"):
        labels = _folder_labels(spec, folder_classes, len(head_names) if label_of else num_classes, root, class_source)
        items = [Item(it.ref, labels[it.label], it.group) for it in items]
    if items is not None:
        if label_of is not None:
            mapped = [label_of(it.label) for it in items]
            if any(m is None for m in mapped):
                bad = next(it.label for it, m in zip(items, mapped) if m is None)
                raise _err(spec, f"label {bad} is not in the class subset: with subset_labels full every label must be a subset class id")
            items = [Item(it.ref, m, it.group) for it, m in zip(items, mapped)]
        bad = [it.label for it in items if not 0 <= it.label < num_classes]
        if bad:
            raise _err(spec, f"label {bad[0]} is outside the {num_classes} class names ({class_source}"
                             f"{', restricted to the subset' if class_map and not set_names else ''}): "
                             "pass class names (or a subset) that name every label")
        if not items:
            raise _err(spec, f"{root!r} holds no images")

    templates, templates_source = resolve_templates(template_spec if template_spec is not None else "single")
    settings = {
        "format": fmt, "root": root, "classnames": class_source, "num_classes": num_classes,
        "templates": templates_source, "num_templates": len(templates),
        "subset": (spec.subset if isinstance(spec.subset, str) else (f"{len(class_map)} classes" if class_map else None))
        if set_names is None else f"objectnet map ({len(class_map)} classes)",
    }
    if spec.builtin:
        settings["builtin"] = spec.builtin
    if spec.split or fmt in ("clip_benchmark", "waterbirds"):
        settings["split"] = spec.split or "test"
    return PreparedSet(name=spec.name, format=fmt, root=root, head_classnames=list(head_names), templates=templates,
                       class_map=class_map, classnames=set_classnames, items=items, shards=shards,
                       group_names=group_names, crop_border=crop_border, label_of=label_of, settings=settings)


# -- suites -----------------------------------------------------------------------------------
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
        unknown = set(entry) - _SET_KEYS
        if unknown:
            raise StarftError(f"suite {path!r}, set {name!r}: unknown key {sorted(unknown)[0]!r}: use "
                              f"{', '.join(sorted(_SET_KEYS - {'name'}))}")
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


# -- reading samples --------------------------------------------------------------------------
def _open_image(ref, crop_border: int = 0) -> Image.Image:
    if isinstance(ref, (bytes, bytearray)):
        image = Image.open(io.BytesIO(ref))
    elif isinstance(ref, str):
        image = Image.open(ref)
    else:
        image = Image.fromarray(ref)
    image = image.convert("RGB")
    if crop_border:
        w, h = image.size
        image = image.crop((crop_border, crop_border, w - crop_border, h - crop_border))
    return image


class ItemDataset(torch.utils.data.Dataset):
    """Map-style samples ``(image tensor or None when unreadable, label, group, ref name)``."""

    def __init__(self, items: list[Item], preprocess, crop_border: int = 0):
        self.items, self.preprocess, self.crop_border = items, preprocess, crop_border

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        name = it.ref if isinstance(it.ref, str) else f"#{i}"
        try:
            return self.preprocess(_open_image(it.ref, self.crop_border)), it.label, it.group, name
        except Exception as e:  # noqa: BLE001 - an unreadable image is reported and skipped
            return None, it.label, it.group, f"{name} ({type(e).__name__}: {e})"


class _DecodeShardSample:
    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, sample):
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        label = parse_label(sample.get("cls"))
        group = parse_label(sample.get("group", b"0"))
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if label is None or group is None or key is None:
            what = "no usable 'cls'" if label is None else "no usable 'group'" if group is None else "no image"
            return None, -1, 0, f"{name} ({what})"
        try:
            return self.preprocess(_open_image(sample[key])), label, group, name
        except Exception as e:  # noqa: BLE001
            return None, label, group, f"{name} ({type(e).__name__}: {e})"


def _every_shard(src):
    return src


def collate(samples):
    """``(images [B,3,H,W] or None, labels [B], groups [B], names [B], skipped names)``: unreadable
    samples are dropped and named."""
    kept = [s for s in samples if s[0] is not None]
    skipped = [s[3] for s in samples if s[0] is None]
    images = torch.stack([s[0] for s in kept]) if kept else None
    return (images, torch.tensor([s[1] for s in kept], dtype=torch.long),
            torch.tensor([s[2] for s in kept], dtype=torch.long), [s[3] for s in kept], skipped)


def batches(prepared: PreparedSet, preprocess, batch_size: int = 128, workers: int = 0) -> Iterator[tuple]:
    """Batches of ``collate``'s form over every sample of the set (in no particular order under workers)."""
    if prepared.items is not None:
        loader = torch.utils.data.DataLoader(ItemDataset(prepared.items, preprocess, prepared.crop_border),
                                             batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
        yield from loader
        return
    import webdataset as wds
    dataset = (wds.WebDataset(prepared.shards, shardshuffle=False, nodesplitter=_every_shard)
               .map(_DecodeShardSample(preprocess))
               .batched(batch_size, collation_fn=collate, partial=True))
    workers = min(workers, len(prepared.shards))
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)
    for images, labels, groups, names, skipped in loader:
        if prepared.label_of is not None and len(labels):
            mapped = [prepared.label_of(int(lab)) for lab in labels]
            if any(m is None for m in mapped):
                bad = next((int(lab), n) for lab, m, n in zip(labels, mapped, names) if m is None)
                raise StarftError(f"eval set {prepared.name!r}: label {bad[0]} of {bad[1]} is not in the class subset: "
                                  "with subset_labels full every label must be a subset class id")
            labels = torch.tensor(mapped, dtype=torch.long)
        outside = (labels < 0) | (labels >= prepared.num_classes)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise StarftError(f"eval set {prepared.name!r}: label {int(labels[i])} of {names[i]} is outside the "
                              f"{prepared.num_classes} class names ({prepared.settings['classnames']}): pass class names "
                              "(or a subset) that name every label")
        yield images, labels, groups, names, skipped
