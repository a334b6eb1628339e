"""The frozen zero-shot model (teacher) that the Star term aligns the student with, and its caches.

``Teacher`` is what the train step holds; ``Teacher.features(batch)`` is the one way to its features.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import NamedTuple

import torch

from open_clip_starft.data.weights import strip_ddp_prefix
from open_clip_starft.host.batchnorm import batchnorm_layers
from open_clip_starft.host.text_prefix import install_prefix_encoding, prefix_length


BATCHNORM_MODES = ("running", "batch")


def make_teacher(model: torch.nn.Module, batchnorm: str = "running") -> torch.nn.Module:
    """An exact, frozen copy of ``model`` in eval mode. Take it right after model creation:
    before locking, grad checkpointing, DDP, compile or resume, so it stays the zero-shot model.

    ``batchnorm``: what the teacher's BatchNorm layers (if any: CLIP's ViTs have none) normalise with.
    ``running``: their running statistics (eval mode, the zero-shot model as it predicts). ``batch``: the
    batch's own statistics, as the student's layers do in train mode, so that at the first step the student
    and the teacher give the same features and the Star term is 0; the teacher's running statistics never
    change (momentum 0). Written by hand: neither torch nor timm has a "batch statistics, frozen buffers" mode."""
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"teacher batchnorm {batchnorm!r}: choose {' or '.join(BATCHNORM_MODES)}")
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    if batchnorm == "batch":
        for module in batchnorm_layers(teacher):
            module.train()
            module.momentum = 0.0  # running = (1 - 0)·running + 0·batch: unchanged
    return teacher


class TeacherTextCache:
    """The teacher's features of spurious captions, kept per caption.

    Spurious captions come from a finite set (classes × caption templates × descriptors: 58,000
    for ImageNet with one template and the background set), and the teacher never changes, so
    each caption's features need computing once. Entries are keyed by the caption's token ids
    (padding excluded) and added until ``max_mb`` is reached; captions beyond that are computed
    each step. Exact: the same features, up to float summation order.
    """

    def __init__(self, max_mb: float):
        self.max_bytes = max_mb * 2 ** 20
        self.features: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def keys(tokens: torch.Tensor) -> list[bytes]:
        """One key per row of ``tokens [B, L]``: its ids up to the last non-pad token."""
        rows = tokens.cpu()
        return [row[:prefix_length(row[None])].numpy().tobytes() for row in rows]

    def __call__(self, teacher, tokens: torch.Tensor, keys: list[bytes], autocast=nullcontext) -> torch.Tensor:
        """Features ``[B, D]`` of ``tokens [B, L]`` (normalised), computing only unseen captions."""
        missing = [i for i, k in enumerate(keys) if k not in self.features]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        fresh = {}
        if missing:
            with torch.inference_mode(), autocast():
                computed = teacher.encode_text(tokens[missing], normalize=True)
            for i, row in zip(missing, computed.clone()):
                fresh[keys[i]] = row
                if keys[i] not in self.features and self.bytes + row.numel() * row.element_size() <= self.max_bytes:
                    self.features[keys[i]] = row.clone()  # its own storage, not a view of the batch
                    self.bytes += row.numel() * row.element_size()
        return torch.stack([self.features.get(k, fresh.get(k)) for k in keys])

    def summary(self) -> str:
        total = self.hits + self.misses
        return (f"{len(self.features)} captions, {self.bytes / 2 ** 20:.1f} MB of {self.max_bytes / 2 ** 20:.0f} MB, "
                f"hit rate {self.hits / total if total else 0:.3f}")


class TeacherImageCache:
    """An APPROXIMATION, off by default (``--starft-teacher-image-cache``): the teacher's image
    features computed once per training image, on the un-augmented image, and reused every epoch.

    Exact StarFT runs the teacher on the same augmented view as the student each step; this trades
    that for one teacher image forward per image over the whole run. Memory: images × D × 2 bytes
    (float16), e.g. 1.28 M ImageNet images × 512 ≈ 1.2 GiB, on the training device.
    """

    def __init__(self):
        self.features: dict[str, torch.Tensor] = {}

    def __call__(self, teacher, plain_images: torch.Tensor, ids: list[str], autocast=nullcontext) -> torch.Tensor:
        """Features ``[B, D]`` (normalised) of ``plain_images [B,3,H,W]`` by sample id."""
        missing = [i for i, key in enumerate(ids) if key not in self.features]
        if missing:
            with torch.inference_mode(), autocast():
                computed = teacher.encode_image(plain_images[missing], normalize=True)
            for i, row in zip(missing, computed.clone()):
                self.features[ids[i]] = row.half()
        return torch.stack([self.features[key] for key in ids]).float()


class TeacherFeatures(NamedTuple):
    """The teacher's view of a batch: ``image [B, D]`` and ``spurious [B, D]`` features
    (L2-normalised), ``scale``, its ``logit_scale.exp()`` (0-dim), and ``bias``, its ``logit_bias``
    (SigLIP models; None for a model without one)."""
    image: torch.Tensor
    spurious: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None


class Teacher:
    """The frozen zero-shot model and its feature caches, for one run.

    ``model`` is copied (``make_teacher``) when the Teacher is made: make it right after model
    creation, before lock, grad checkpointing, DDP, compile or resume. Its text tower stops at a
    batch's longest caption when the architecture allows (``text_prefix``; exact).
    ``text_cache_mb > 0``: the teacher's features of each spurious caption computed once
    (``TeacherTextCache``, exact). ``image_cache``: its image features once per image on the
    un-augmented view (``TeacherImageCache``, an approximation). ``batchnorm``: see ``make_teacher``.
    """

    def __init__(self, model: torch.nn.Module, *, text_cache_mb: float = 0.0, image_cache: bool = False,
                 batchnorm: str = "running"):
        self.model = make_teacher(model, batchnorm)
        install_prefix_encoding(self.model)
        self.text_cache = TeacherTextCache(text_cache_mb) if text_cache_mb > 0 else None
        self.image_cache = TeacherImageCache() if image_cache else None

    def cache_keys(self, spurious: torch.Tensor) -> list[bytes] | None:
        """The text cache's keys of ``spurious [B, L]`` (give CPU tokens: no device sync); None without the cache."""
        return self.text_cache.keys(spurious) if self.text_cache is not None else None

    def features(self, batch, autocast=nullcontext) -> TeacherFeatures:
        """The teacher's features of ``batch`` (a ``Batch`` on the device), under inference mode and the
        run's autocast: image features of ``batch.images`` (of ``batch.plain_images`` by
        ``batch.sample_ids`` with the image cache), spurious-caption features of ``batch.spurious``
        (through the text cache, keyed by ``batch.keys`` or keys computed here), and the scale."""
        teacher = self.model
        with torch.inference_mode(), autocast():
            if self.image_cache is None:
                image = teacher.encode_image(batch.images, normalize=True)
            if self.text_cache is None:
                spurious = teacher.encode_text(batch.spurious, normalize=True)
            scale = teacher.logit_scale.exp()
        if self.image_cache is not None:
            image = self.image_cache(teacher, batch.plain_images, batch.sample_ids, autocast)
        if self.text_cache is not None:
            keys = batch.keys if batch.keys is not None else self.text_cache.keys(batch.spurious)
            spurious = self.text_cache(teacher, batch.spurious, keys, autocast)
        # Inference tensors may not enter the student's autograd graph; clones of these [B, D] are cheap.
        bias = getattr(teacher, "logit_bias", None)
        return TeacherFeatures(image.clone(), spurious.clone(), scale.clone(),
                               bias.detach().clone() if bias is not None else None)

    def load_weights(self, state_dict: dict) -> None:
        """Replace the teacher's weights (a bare model state dict; DDP's ``module.`` prefixes are dropped)."""
        self.model.load_state_dict(strip_ddp_prefix(state_dict))

    def fingerprint(self) -> float:
        return fingerprint(self.model)


def fingerprint(model: torch.nn.Module) -> float:
    """Σ|θ| in float64 over all parameters: a cheap check that the teacher never changes."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))
