"""Layout ``wds``: webdataset shards (a brace pattern, a ``.tar``, ``::``-joined sources or a folder
of ``.tar`` files) whose samples hold an image, an integer ``cls`` and an optional integer
``group``; class names from ``--classnames`` or ``classnames.txt`` beside the shards."""
from __future__ import annotations

import json
import os

from open_clip_starft.eval.sets.registry import Listing, register_layout
from open_clip_starft.eval.sets.spec import EvalSetSpec, set_error
from open_clip_starft.method.captions import load_classnames


def shard_urls(spec: EvalSetSpec, root: str) -> list[str]:
    """The shards of a folder (its ``.tar`` files, sorted) or a pattern (OpenCLIP's ``expand_urls``);
    local shards must all exist."""
    from open_clip_train.data import expand_urls  # both import torch: not on the --help path

    from open_clip_starft.data.checks import missing_local_shards
    if os.path.isdir(root):
        urls = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".tar"))
    else:
        urls, _ = expand_urls(root)
    local, missing = missing_local_shards(urls)
    if not urls or (local and len(missing) == len(local)):
        raise set_error(spec, f"root {root!r} does not exist (no shard found{', first: ' + repr(missing[0]) if missing else ''}): "
                              "check the path and the brace pattern")
    if missing:
        raise set_error(spec, f"{len(missing)} of {len(local)} shards of {root!r} do not exist (first: {missing[0]!r}): fix the pattern")
    return urls


def shard_sizes(shards: list[str]) -> dict[str, int] | None:
    """Samples per shard from the ``sizes.json`` beside the shards (OpenCLIP's and make-shards'
    record, keyed by file name); None unless every shard is listed."""
    sizes, found = {}, {}
    for url in shards:
        folder = os.path.dirname(url)
        if folder not in found:
            path = os.path.join(folder, "sizes.json")
            try:
                with open(path, encoding="utf-8") as f:
                    found[folder] = json.load(f)
            except (OSError, ValueError):
                found[folder] = None
        listed = found[folder]
        if not isinstance(listed, dict) or not isinstance(listed.get(os.path.basename(url)), int):
            return None
        sizes[url] = listed[os.path.basename(url)]
    return sizes


def _folder_of_shards(spec: EvalSetSpec) -> bool:
    return os.path.isdir(spec.root) and any(name.endswith(".tar") for name in os.listdir(spec.root))


@register_layout("wds", detect=_folder_of_shards, priority=60, pattern_root=True)
def list_wds(spec: EvalSetSpec, classnames, class_source) -> Listing:
    root = spec.root
    shards = shard_urls(spec, root)
    if classnames is None:
        cfile = os.path.join(root if os.path.isdir(root) else os.path.dirname(shards[0]), "classnames.txt")
        if not os.path.isfile(cfile):
            raise set_error(spec, f"no class names for the shards of {root!r}: pass --classnames (or put classnames.txt beside the shards)")
        classnames, class_source = load_classnames(cfile), cfile
    return Listing(classnames, class_source, shards=shards, shard_sizes=shard_sizes(shards))
