"""The metrics we report, computed once (``metrics_of_scores``), and the zero-shot heads.

- ``SampleScores``: per image, label, group, prediction, top-5 hit and confidence;
  ``metrics_of_scores``: top-1, top-5, per-class, per-group, worst-group and average-group accuracy,
  ECE, from integer counts and exact sums (the same numbers from one process or several);
- ``HeadCache``: the zero-shot heads, the package's one call of OpenCLIP's ``build_zero_shot_classifier``
  (class names × caption templates; templates that cut the class names off are refused first); ``collect_logits``: scaled logits of a set's batches.

``eval.evaluator.Evaluator`` puts them together; every command evaluates through it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from open_clip import build_zero_shot_classifier

from open_clip_starft.method.captions import check_class_prompts


@dataclasses.dataclass
class SampleScores:
    """What the metrics need of each scored image, ``[N]`` tensors on the CPU: the label, group and
    predicted class, whether the label is in the top 5 (None with fewer than 5 classes) and the
    confidence (the model's probability of its prediction, float64: maximum softmax probability, or a SigLIP
    model's sigmoid, see ``from_logits``). Small enough to gather across processes."""
    labels: torch.Tensor
    groups: torch.Tensor
    predictions: torch.Tensor
    top5_hits: torch.Tensor | None
    confidence: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None,
                    logit_bias: float | None = None) -> "SampleScores":
        """Scores of scaled logits ``[N, K]``: the probabilities are the model's own, a softmax over the classes,
        or with ``logit_bias`` (a SigLIP model) each class's sigmoid ``σ(logit + bias)``, so the confidence
        (and ECE) is ``σ(max logit + bias)``; the prediction (top-1, top-5) is the same either way."""
        logits, labels = logits.float().cpu(), labels.long().cpu()
        groups = torch.zeros_like(labels) if groups is None else groups.long().cpu()
        if logit_bias is None:
            confidence, predictions = torch.softmax(logits.double(), dim=1).max(dim=1)
        else:
            confidence, predictions = torch.sigmoid(logits.double() + logit_bias).max(dim=1)
        top5 = None if logits.shape[1] < 5 else (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
        return cls(labels, groups, predictions, top5, confidence)

    @classmethod
    def cat(cls, parts: Sequence["SampleScores"]) -> "SampleScores":
        """The scores of several parts (processes, batches) as one."""
        top5 = None if any(p.top5_hits is None for p in parts) else torch.cat([p.top5_hits for p in parts])
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("labels", "groups", "predictions")),
                   top5, torch.cat([p.confidence for p in parts]))


def _share(hits: torch.Tensor) -> float:
    """Share of true values, from an integer count (exact, the same in any order)."""
    return int(hits.sum()) / hits.numel()


def group_metrics(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict:
    """``top1`` (share correct), ``groups`` {group id: accuracy}, ``worst_group`` (minimum over
    groups), ``avg_group`` (unweighted mean over groups) and ``n`` for ``[N]`` predictions."""
    correct = predictions == labels
    per_group = {int(g): _share(correct[groups == g]) for g in torch.unique(groups)}
    return {
        "top1": _share(correct),
        "worst_group": min(per_group.values()),
        "avg_group": math.fsum(per_group.values()) / len(per_group),
        "groups": per_group,
        "n": int(labels.numel()),
    }


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float | None:
    """Share of rows whose label is among the ``k`` highest logits; None when there are fewer than
    ``k`` classes (top-5 of a 4-class set says nothing)."""
    if logits.shape[1] < k:
        return None
    return _share((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1))


def ece_of_confidence(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017): confidences in ``n_bins`` equal-width bins ``(i/B, (i+1)/B]``;
    ``Σ_b |B_b|/n · |accuracy(B_b) − mean confidence(B_b)|``, each bin's sums exact (``math.fsum``),
    so the value does not depend on the order of the samples (one process or several)."""
    confidence = confidence.double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    n, terms = confidence.numel(), []
    for b in torch.unique(bins):
        in_bin = bins == b
        size = int(in_bin.sum())
        gap = int(correct[in_bin].sum()) / size - math.fsum(confidence[in_bin].tolist()) / size
        terms.append(size / n * abs(gap))
    return math.fsum(terms)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of probabilities ``[N, K]`` (``ece_of_confidence`` of their maxima)."""
    confidence, predictions = probs.double().max(dim=1)
    return ece_of_confidence(confidence, predictions == labels, n_bins)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """{class id: accuracy} over the classes that have samples."""
    correct = predictions == labels
    return {int(c): _share(correct[labels == c]) for c in torch.unique(labels)}


def metrics_of_scores(scores: SampleScores, n_bins: int = 15) -> dict:
    """Every metric we report, the one computation of them: ``top1``, ``top5`` (None with fewer than 5
    classes), ``per_class`` {class: acc}, ``per_class_mean`` (balanced accuracy over the classes present),
    the ``group_metrics`` (``groups``, ``worst_group``, ``avg_group``), ``ece`` and ``n``."""
    metrics = group_metrics(scores.predictions, scores.labels, scores.groups)
    per_class = per_class_accuracy(scores.predictions, scores.labels)
    metrics.update({
        "top5": None if scores.top5_hits is None else _share(scores.top5_hits),
        "per_class": per_class,
        "per_class_mean": math.fsum(per_class.values()) / len(per_class),
        "ece": ece_of_confidence(scores.confidence, scores.predictions == scores.labels, n_bins),
    })
    return metrics


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None,
                           n_bins: int = 15) -> dict:
    """``metrics_of_scores`` of scaled logits ``[N, K]`` against labels (no groups: one group 0)."""
    return metrics_of_scores(SampleScores.from_logits(logits, labels, groups), n_bins)


def restrict_logits(logits: torch.Tensor, class_map) -> torch.Tensor:
    """Logits over a set's own classes from logits over the head's classes.

    ``class_map[k]`` lists the head classes of the set's class ``k``: one each for a class subset
    (ImageNet-R and -A: the other 800 logits are dropped), several for ObjectNet (the maximum over
    the ImageNet classes mapped to an ObjectNet class, as in WiSE-FT). None: the logits as they are."""
    if class_map is None:
        return logits
    if all(len(ids) == 1 for ids in class_map):
        return logits[:, torch.tensor([ids[0] for ids in class_map], device=logits.device)]
    return torch.stack([logits[:, list(ids)].max(dim=1).values for ids in class_map], dim=1)


# -- evaluating checkpoints on prepared sets ----------------------------------------------------
class HeadCache:
    """Zero-shot heads of one model: for each (class names, templates), the text embeddings of the
    classes the sets need (OpenCLIP's ``build_zero_shot_classifier``), computed once. Sets that share
    class names and templates (ImageNet and its shifts) share the head; a subset's head is a slice."""

    def __init__(self, model, tokenizer, device="cpu", precision="fp32"):
        self.model, self.tokenizer, self.device, self.precision = model, tokenizer, device, precision
        self._heads: dict[tuple, torch.Tensor] = {}
        self.seconds = 0.0

    @staticmethod
    def key(prepared) -> tuple:
        return tuple(prepared.head_classnames), tuple(prepared.templates)

    def prepare(self, sets) -> None:
        """Build the heads of ``sets``, each over the union of the classes its sets use."""
        import time
        from open_clip_train.precision import get_autocast
        needed: dict[tuple, set] = {}
        for s in sets:
            cols = needed.setdefault(self.key(s), set())
            cols.update(range(len(s.head_classnames)) if s.class_map is None else (i for ids in s.class_map for i in ids))
        autocast = get_autocast(self.precision, device_type=torch.device(self.device).type)
        for key, cols in needed.items():
            if key in self._heads:
                continue
            names, templates = key
            cols = sorted(cols)
            check_class_prompts(self.tokenizer, [names[i] for i in cols], templates)  # no head of cut-off prompts
            start = time.perf_counter()
            with torch.no_grad(), autocast():
                part = build_zero_shot_classifier(
                    self.model, self.tokenizer, [names[i] for i in cols],
                    [lambda c, t=t: t.replace("{}", c) for t in templates],
                    num_classes_per_batch=10, device=self.device)
            self.seconds += time.perf_counter() - start
            head = torch.zeros(part.shape[0], len(names), dtype=torch.float32, device=part.device)
            head[:, cols] = part.float()
            self._heads[key] = head

    def __getitem__(self, prepared) -> torch.Tensor:
        return self._heads[self.key(prepared)]


@torch.no_grad()
def collect_logits(model, head: torch.Tensor, batch_iter, device="cpu", precision="fp32", class_map=None,
                   logit_scale: float = 100.0):
    """``(logits [N, K_set], labels, groups, skipped names)`` over the batches of ``eval_sets.batches``:
    ``logit_scale · image features @ head``, restricted to the set's classes."""
    from open_clip import get_input_dtype
    from open_clip_train.precision import get_autocast
    autocast = get_autocast(precision, device_type=torch.device(device).type)
    input_dtype = get_input_dtype(precision)
    logits, labels, groups, skipped = [], [], [], []
    for images, lab, grp, _names, bad in batch_iter:
        skipped += bad
        if images is None:
            continue
        with autocast():
            features = model.encode_image(images.to(device=device, dtype=input_dtype), normalize=True)
        out = logit_scale * features.float() @ head
        logits.append(restrict_logits(out, class_map).cpu())
        labels.append(lab)
        groups.append(grp)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), skipped
    return torch.cat(logits), torch.cat(labels), torch.cat(groups), skipped
