"""Layout ``clip_benchmark``: CLIP_benchmark's webdataset layout, as in the ``clip-benchmark/wds_*``
sets: ``ROOT/SPLIT/{0..n-1}.tar`` with ``ROOT/SPLIT/nshards.txt``, ``ROOT/classnames.txt`` and
``ROOT/zeroshot_classification_templates.txt`` (``{c}`` placeholders); split ``test`` by default."""
from __future__ import annotations

import os

from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, set_error
from open_clip_starft.eval.sets.wds import shard_urls
from open_clip_starft.method.captions import load_classnames


def _has_nshards(spec: EvalSetSpec) -> bool:
    return os.path.isfile(os.path.join(spec.root, spec.split or "test", "nshards.txt"))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


@register_layout("clip_benchmark", detect=_has_nshards, priority=20)
def list_clip_benchmark(spec: EvalSetSpec, classnames, class_source) -> Listing:
    root, split = spec.root, spec.split or "test"
    nfile = os.path.join(root, split, "nshards.txt")
    if not os.path.isfile(nfile):
        raise set_error(spec, f"{nfile!r} not found: a CLIP_benchmark set has ROOT/{split}/nshards.txt and ROOT/{split}/0.tar ...")
    kind_file = os.path.join(root, "dataset_type.txt")
    if os.path.isfile(kind_file) and _read(kind_file).lower() not in ("", "classification"):
        raise set_error(spec, f"{root!r} is a {_read(kind_file)} set: only classification sets are evaluated")
    try:
        n = int(_read(nfile))
    except ValueError:
        raise set_error(spec, f"{nfile!r} must hold the number of shards (an integer)") from None
    shards = shard_urls(spec, os.path.join(root, split, "{0..%d}.tar" % (n - 1)) if n > 1 else os.path.join(root, split, "0.tar"))
    if classnames is None:
        cfile = os.path.join(root, "classnames.txt")
        if not os.path.isfile(cfile):
            raise set_error(spec, f"{cfile!r} not found: pass --classnames")
        classnames, class_source = load_classnames(cfile), cfile
    tfile = os.path.join(root, "zeroshot_classification_templates.txt")
    return Listing(classnames, class_source, shards=shards, templates=tfile if os.path.isfile(tfile) else None,
                   split=split)
