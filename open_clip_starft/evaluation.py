"""Zero-shot evaluation with group metrics (average and worst-group accuracy).

The zero-shot head is OpenCLIP's ``build_zero_shot_classifier`` over class names × caption
templates; images come from webdataset shards with ``cls`` and an optional integer ``group``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import webdataset as wds
from open_clip import build_zero_shot_classifier

from .data import IMAGE_KEYS, parse_label


def group_metrics(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict:
    """``top1`` (share correct), ``groups`` {group id: accuracy}, ``worst_group`` (minimum over
    groups), ``avg_group`` (unweighted mean over groups) and ``n`` for ``[N]`` predictions."""
    correct = (predictions == labels).double()
    per_group = {int(g): float(correct[groups == g].mean()) for g in torch.unique(groups)}
    return {
        "top1": float(correct.mean()),
        "worst_group": min(per_group.values()),
        "avg_group": sum(per_group.values()) / len(per_group),
        "groups": per_group,
        "n": int(labels.numel()),
    }


@torch.no_grad()
def evaluate_zero_shot(model, tokenizer, preprocess, shards: str, classnames: Sequence[str],
                       templates: Sequence[str] = ("a photo of a {}.",), batch_size: int = 128,
                       device: str = "cpu") -> dict:
    """Zero-shot classification of the images in ``shards`` (a brace pattern) with ``model``:
    the ``group_metrics`` of its predictions (samples without ``group`` form group 0)."""
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, list(templates),
                                            num_classes_per_batch=None, device=device)  # [D, K]
    dataset = (wds.WebDataset(shards, shardshuffle=False).decode("pilrgb")
               .map(lambda s: (preprocess(next(s[k] for k in IMAGE_KEYS if k in s)), parse_label(s["cls"]),
                               parse_label(s.get("group", b"0"))))
               .batched(batch_size, partial=True))
    preds, labels, groups = [], [], []
    for images, cls, group in dataset:
        features = model.encode_image(images.to(device), normalize=True)
        preds.append((features @ classifier).argmax(dim=1).cpu())
        labels.append(torch.as_tensor(cls))
        groups.append(torch.as_tensor(group))
    return group_metrics(torch.cat(preds), torch.cat(labels), torch.cat(groups))
