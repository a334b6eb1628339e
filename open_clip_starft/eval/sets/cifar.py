"""Layout ``cifar10.02``: CIFAR-10's test batch (``cifar-10-batches-py/test_batch``) and CIFAR-10.2's
``cifar102_test.npz`` under one root; the source is the group (0: CIFAR-10, 1: CIFAR-10.2)."""
from __future__ import annotations

import os
import pickle

from open_clip_starft.errors import DataError, one_line
from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item, set_error

CIFAR10_CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_GROUP_NAMES = ["cifar10", "cifar10.2"]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's python batches hold: a dict of lists, strings, numbers and one
    numpy array (numpy's array reconstruction, ``dtype``, and ``_codecs.encode`` for bytes written by
    Python 3 at protocol 2). Any other global is refused, so a crafted file runs nothing."""

    def find_class(self, module: str, name: str):
        import codecs

        import numpy as np
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
        for core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # NumPy 1 and 2 names
            allowed[(core, "_reconstruct")] = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own, either version
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"it needs {module}.{name}, which a CIFAR-10 batch never holds")
        return allowed[(module, name)]


def read_cifar_batch(path: str):
    """``(data [N, 3072] uint8, labels [N])`` of a CIFAR-10 python batch (``test_batch``), read with
    ``_BatchUnpickler`` (keys as Python 2 wrote them, str or bytes); a crafted, corrupt or foreign file
    is a one-line DataError naming it."""
    import numpy as np
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch, refused ({type(e).__name__}: {one_line(e, 120)}): "
                        "use the cifar-10-python.tar.gz release's file") from None
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()} if isinstance(d, dict) else {}
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or not isinstance(labels, list) or len(labels) != len(data):
        raise DataError(f"{path} is not a CIFAR-10 python batch (no uint8 'data' [N, 3072] with N 'labels'): "
                        "use the cifar-10-python.tar.gz release's file")
    return data, labels


def cifar_items(spec: EvalSetSpec, root: str) -> list[Item]:
    """Items holding the images as ``[32, 32, 3]`` uint8 arrays."""
    import numpy as np
    batch = os.path.join(root, "cifar-10-batches-py", "test_batch")
    npz = os.path.join(root, "cifar102_test.npz")
    for path in (batch, npz):
        if not os.path.isfile(path):
            raise set_error(spec, f"{path!r} not found: CIFAR-10.02 needs CIFAR-10's cifar-10-batches-py/test_batch and "
                                  "CIFAR-10.2's cifar102_test.npz under the root")
    try:
        data, labels = read_cifar_batch(batch)
    except DataError as e:
        raise set_error(spec, str(e)) from None
    images10 = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    with np.load(npz) as z:  # allow_pickle=False: arrays only
        images102, labels102 = z["images"], z["labels"]
    items = [Item(img, int(lab), 0) for img, lab in zip(images10, labels)]
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
