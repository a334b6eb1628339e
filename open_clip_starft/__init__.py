"""StarFT for OpenCLIP: contrastive fine-tuning with spurious textual alignment regularisation.

The public names below are imported on first use (PEP 562's module ``__getattr__``), so ``import
open_clip_starft`` and the ``open-clip-starft`` command's ``--help`` and one-line refusals do not pay for
importing torch and open_clip (seconds per process); ``from open_clip_starft import StarLoss`` works as
before.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "CaptionBuilder": "open_clip_starft.method.captions",
    "load_classnames": "open_clip_starft.method.captions",
    "load_templates": "open_clip_starft.method.captions",
    "load_descriptors": "open_clip_starft.method.descriptors",
    "StarftError": "open_clip_starft.errors",
    "StarLoss": "open_clip_starft.method.loss",
    "star_loss": "open_clip_starft.method.loss",
    "star_lambda": "open_clip_starft.method.schedule",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'open_clip_starft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC})
