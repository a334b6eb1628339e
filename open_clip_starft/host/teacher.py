"""The frozen zero-shot model (teacher) that the Star term aligns the student with."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from open_clip_starft.host.text_prefix import prefix_length


def make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """An exact, frozen copy of ``model`` in eval mode. Take it right after model creation:
    before locking, grad checkpointing, DDP, compile or resume, so it stays the zero-shot model."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
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


def teacher_features(teacher: torch.nn.Module, images: torch.Tensor, spurious: torch.Tensor, autocast=nullcontext,
                     text_cache: TeacherTextCache | None = None, spurious_keys: list[bytes] | None = None,
                     image_cache: TeacherImageCache | None = None, plain_images: torch.Tensor | None = None,
                     sample_ids: list[str] | None = None):
    """The teacher's image features ``[B, D]``, spurious-caption features ``[B, D]`` and
    ``logit_scale.exp()`` (0-dim), under inference mode and the run's autocast. With
    ``image_cache`` the image features come from it (un-augmented images; an approximation)."""
    with torch.inference_mode(), autocast():
        if image_cache is None:
            image_features = teacher.encode_image(images, normalize=True)
        if text_cache is None:
            spurious_features = teacher.encode_text(spurious, normalize=True)
        scale = teacher.logit_scale.exp()
    if image_cache is not None:
        image_features = image_cache(teacher, plain_images, sample_ids, autocast)
    if text_cache is not None:
        spurious_features = text_cache(teacher, spurious, spurious_keys, autocast)
    # Inference tensors may not enter the student's autograd graph; clones of these [B, D] are cheap.
    return image_features.clone(), spurious_features.clone(), scale.clone()


def fingerprint(model: torch.nn.Module) -> float:
    """Σ|θ| in float64 over all parameters: a cheap check that the teacher never changes."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))
