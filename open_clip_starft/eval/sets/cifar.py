"""Layout ``cifar10.02``: CIFAR-10's test batch (``cifar-10-batches-py/test_batch``) and CIFAR-10.2's
``cifar102_test.npz`` under one root; the source is the group (0: CIFAR-10, 1: CIFAR-10.2)."""
from __future__ import annotations

import os
import pickle

from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error

CIFAR10_CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_GROUP_NAMES = ["cifar10", "cifar10.2"]


def cifar_items(spec: EvalSetSpec, root: str) -> list[Item]:
    """Items holding the images as ``[32, 32, 3]`` uint8 arrays."""
    import numpy as np
    batch = os.path.join(root, "cifar-10-batches-py", "test_batch")
    npz = os.path.join(root, "cifar102_test.npz")
    for path in (batch, npz):
        if not os.path.isfile(path):
            raise set_error(spec, f"{path!r} not found: CIFAR-10.02 needs CIFAR-10's cifar-10-batches-py/test_batch and "
                                  "CIFAR-10.2's cifar102_test.npz under the root")
    with open(batch, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    images10 = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    with np.load(npz) as z:
        images102, labels102 = z["images"], z["labels"]
    items = [Item(img, int(lab), 0) for img, lab in zip(images10, d["labels"])]
    items += [Item(img, int(lab), 1) for img, lab in zip(images102, labels102)]
    return items


def _has_npz(spec: EvalSetSpec) -> bool:
    return os.path.isfile(os.path.join(spec.root, "cifar102_test.npz"))


@register_layout("cifar10.02", detect=_has_npz, priority=40)
def list_cifar(spec: EvalSetSpec, classnames, class_source) -> Listing:
    items = cifar_items(spec, spec.root)
    if classnames is None:
        classnames, class_source = list(CIFAR10_CLASSNAMES), "cifar10"
    return Listing(classnames, class_source, items=items, group_names=list(CIFAR_GROUP_NAMES))
