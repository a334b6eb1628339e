"""Built-in suite entries: a set named like one of these (or with ``builtin: NAME``) takes these
settings; only its root is needed."""
from __future__ import annotations

import dataclasses
from typing import Any

from open_clip_starft.eval.sets.cifar import CIFAR10_CLASSNAMES, CIFAR_GROUP_NAMES
from open_clip_starft.eval.sets.spec import EvalSetSpec, set_error
from open_clip_starft.eval.sets.waterbirds import WATERBIRDS_CLASSNAMES, WATERBIRDS_GROUP_NAMES

BUILTIN_SETS: dict[str, dict[str, Any]] = {
    "imagenet": {"classnames": "imagenet", "templates": "openai"},
    "imagenet-v2": {"classnames": "imagenet", "templates": "openai"},
    "imagenet-r": {"classnames": "imagenet", "templates": "openai", "subset": "imagenet-r"},
    "imagenet-a": {"classnames": "imagenet", "templates": "openai", "subset": "imagenet-a"},
    "imagenet-sketch": {"classnames": "imagenet", "templates": "openai"},
    "objectnet": {"format": "objectnet", "classnames": "imagenet", "templates": "openai"},
    "waterbirds": {"format": "waterbirds", "classnames": WATERBIRDS_CLASSNAMES, "templates": "single",
                   "group_names": WATERBIRDS_GROUP_NAMES},
    "pacs": {"format": "domains", "templates": "single"},
    "cifar10.02": {"format": "cifar10.02", "classnames": CIFAR10_CLASSNAMES, "templates": "single",
                   "group_names": CIFAR_GROUP_NAMES},
}


def apply_builtin(spec: EvalSetSpec) -> EvalSetSpec:
    """Fill the settings the user left unset from the built-in entry of ``spec.builtin`` or ``spec.name``."""
    key = spec.builtin or (spec.name if spec.name in BUILTIN_SETS else None)
    if key is None:
        return spec
    if key not in BUILTIN_SETS:
        raise set_error(spec, f"unknown built-in set {key!r}: use one of {', '.join(BUILTIN_SETS)}")
    values = {k: v for k, v in BUILTIN_SETS[key].items()
              if getattr(spec, k) in (None, "auto") or (k == "format" and spec.format == "auto")}
    return dataclasses.replace(spec, builtin=key, **values)
