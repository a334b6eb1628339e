"""The frozen zero-shot model (teacher) that the Star term aligns the student with."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch


def make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """An exact, frozen copy of ``model`` in eval mode. Take it right after model creation:
    before locking, grad checkpointing, DDP, compile or resume, so it stays the zero-shot model."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_features(teacher: torch.nn.Module, images: torch.Tensor, spurious: torch.Tensor, autocast=nullcontext):
    """The teacher's image features ``[B, D]``, spurious-caption features ``[B, D]`` and
    ``logit_scale.exp()`` (0-dim), under inference mode and the run's autocast."""
    with torch.inference_mode(), autocast():
        out = teacher(images, spurious)
    # Inference tensors may not enter the student's autograd graph; clones of these [B, D] are cheap.
    return out["image_features"].clone(), out["text_features"].clone(), out["logit_scale"].clone()


def fingerprint(model: torch.nn.Module) -> float:
    """Σ|θ| in float64 over all parameters: a cheap check that the teacher never changes."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))
