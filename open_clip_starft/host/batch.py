"""One StarFT training batch, as a named structure.

The data pipeline's ``Collate`` (``data/training.py``) yields a positional tuple today
``(images, texts, spurious, labels[, plain_images, sample_ids])``; ``Batch.of`` accepts that
tuple or a ``Batch``, so the step works with either.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """A batch of B labelled images with their captions.

    ``images [B,3,H,W]`` (augmented); ``texts [B,L]`` token ids of the clean captions;
    ``spurious [B,L]`` token ids of the spurious captions; ``labels [B]`` class ids (long).
    With ``--starft-teacher-image-cache``: ``plain_images [B,3,H,W]`` (un-augmented, the eval
    transform) and ``sample_ids`` (B strings, shard URL/key). ``keys``: the teacher text cache's
    key of each spurious caption (B bytes), computed on the CPU before the batch moves to the
    device (``Teacher.cache_keys``), so the cache costs no device synchronisation.
    """
    images: torch.Tensor
    texts: torch.Tensor
    spurious: torch.Tensor
    labels: torch.Tensor
    plain_images: torch.Tensor | None = None
    sample_ids: list[str] | None = None
    keys: list[bytes] | None = None

    @classmethod
    def of(cls, batch) -> "Batch":
        """``batch`` as a ``Batch``: a ``Batch`` as it is, a 4- or 6-tuple from ``Collate`` by position."""
        return batch if isinstance(batch, cls) else cls(*batch)

    def to(self, device, dtype=None) -> "Batch":
        """The tensors on ``device`` (non-blocking); images (both views) in ``dtype`` when given."""
        def move(t, image=False):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if image else None, non_blocking=True)
        return self._replace(images=move(self.images, True), texts=move(self.texts), spurious=move(self.spurious),
                             labels=move(self.labels), plain_images=move(self.plain_images, True))
