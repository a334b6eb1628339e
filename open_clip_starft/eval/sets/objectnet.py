"""Layout ``objectnet``: the ObjectNet release (``images/`` and ``mappings/``).

The 113 classes that map to ImageNet, each scored by the maximum logit of its ImageNet classes
(the mapping of WiSE-FT / CLIP_benchmark); the 2-pixel border of every image is cropped.
"""
from __future__ import annotations

import json
import os

from open_clip_starft.eval.sets.folder import is_image
from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error
from open_clip_starft.method.captions import load_classnames

OBJECTNET_BORDER = 2
MAPPING = "objectnet_to_imagenet_1k.json"


def objectnet_classes(spec: EvalSetSpec, root: str, head_names: list[str]):
    """``(class map [ObjectNet class → ImageNet ids], ObjectNet class names, items)``."""
    maps = os.path.join(root, "mappings")
    try:
        with open(os.path.join(maps, "folder_to_objectnet_label.json")) as f:
            label_to_folder = {v: k for k, v in json.load(f).items()}
        with open(os.path.join(maps, MAPPING)) as f:
            objectnet_to_imagenet = json.load(f)
        with open(os.path.join(maps, "pytorch_to_imagenet_2012_id.json")) as f:
            id_2012_to_pytorch = {v: int(k) for k, v in json.load(f).items()}
        with open(os.path.join(maps, "imagenet_to_label_2012_v2")) as f:
            name_to_index = {line.strip(): id_2012_to_pytorch[i] for i, line in enumerate(f)}
    except (OSError, KeyError, ValueError) as e:
        raise set_error(spec, f"cannot read ObjectNet's mappings under {maps!r} ({e}): give the objectnet-1.0 folder as root") from None
    folder_to_ids = {}
    for objectnet_name, imagenet_names in objectnet_to_imagenet.items():
        folder_to_ids[label_to_folder[objectnet_name]] = [int(name_to_index[n]) for n in imagenet_names.split("; ")]
    folders = sorted(folder_to_ids)
    bad = [i for ids in folder_to_ids.values() for i in ids if i >= len(head_names)]
    if bad:
        raise set_error(spec, f"ObjectNet maps to ImageNet class {bad[0]}, outside the {len(head_names)} class names: use --classnames imagenet")
    images = os.path.join(root, "images")
    items = []
    for label, folder in enumerate(folders):
        path = os.path.join(images, folder)
        if os.path.isdir(path):
            items += [Item(os.path.join(path, n), label) for n in sorted(os.listdir(path)) if is_image(n)]
    names = {v: k for k, v in label_to_folder.items()}
    return [folder_to_ids[f] for f in folders], [names[f].lower() for f in folders], items


def _has_mappings(spec: EvalSetSpec) -> bool:
    return os.path.isfile(os.path.join(spec.root, "mappings", MAPPING))


@register_layout("objectnet", detect=_has_mappings, priority=50)
def list_objectnet(spec: EvalSetSpec, classnames, class_source) -> Listing:
    if classnames is None:
        classnames, class_source = load_classnames("imagenet"), "imagenet"
    class_map, set_names, items = objectnet_classes(spec, spec.root, classnames)
    return Listing(classnames, class_source, items=items, class_map=class_map, set_classnames=set_names,
                   crop_border=OBJECTNET_BORDER)
