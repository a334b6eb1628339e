"""Zero-shot evaluation with group metrics (average and worst-group accuracy).

The zero-shot head is OpenCLIP's ``build_zero_shot_classifier`` over class names × caption
templates; images come from prepared eval sets (``eval.sets``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from open_clip import build_zero_shot_classifier


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
    the ``group_metrics`` of its predictions (samples without ``group`` form group 0). The same
    path as ``evaluate_prepared`` (a ``wds`` eval set), with only the group metrics."""
    from open_clip_starft.eval.sets import EvalSetSpec, batches, prepare_set
    prepared = prepare_set(EvalSetSpec(name=shards, root=shards, format="wds", classnames=list(classnames),
                                       templates=list(templates)))
    model.eval()
    heads = HeadCache(model, tokenizer, device)
    heads.prepare([prepared])
    logits, labels, groups, _ = collect_logits(model, heads[prepared], batches(prepared, preprocess, batch_size), device)
    return group_metrics(logits.argmax(dim=1), labels, groups)


# -- metrics on logits ------------------------------------------------------------------------
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float | None:
    """Share of rows whose label is among the ``k`` highest logits; None when there are fewer than
    ``k`` classes (top-5 of a 4-class set says nothing)."""
    if logits.shape[1] < k:
        return None
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017): confidences (max probability) in ``n_bins`` equal-width bins
    ``(i/B, (i+1)/B]``; ``Σ_b |B_b|/n · |accuracy(B_b) − mean confidence(B_b)|``."""
    confidence, predictions = probs.double().max(dim=1)
    correct = (predictions == labels).double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in torch.unique(bins):
        in_bin = bins == b
        ece += in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """{class id: accuracy} over the classes that have samples."""
    correct = (predictions == labels).double()
    return {int(c): float(correct[labels == c].mean()) for c in torch.unique(labels)}


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


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None,
                           n_bins: int = 15) -> dict:
    """All metrics of scaled logits ``[N, K]`` (softmax gives the probabilities) against labels:
    ``top1``, ``top5``, ``per_class`` {class: acc}, ``per_class_mean`` (balanced accuracy over the
    classes present), the ``group_metrics`` (``groups``, ``worst_group``, ``avg_group``; no groups:
    one group 0), ``ece`` and ``n``."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    groups = torch.zeros_like(labels) if groups is None else groups.long().cpu()
    predictions = logits.argmax(dim=1)
    metrics = group_metrics(predictions, labels, groups)
    per_class = per_class_accuracy(predictions, labels)
    metrics.update({
        "top5": topk_accuracy(logits, labels, 5),
        "per_class": per_class,
        "per_class_mean": sum(per_class.values()) / len(per_class),
        "ece": expected_calibration_error(torch.softmax(logits.double(), dim=1), labels, n_bins),
    })
    return metrics


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


def counted(batch_iter, bar):
    """The batches of ``batch_iter``, counting each batch's images (read or skipped) on ``bar``."""
    for batch in batch_iter:
        bar.update(len(batch[1]) + len(batch[4]))
        yield batch


def evaluate_prepared(model, preprocess, tokenizer, sets, *, label: str = "model", device="cpu", precision="fp32",
                      batch_size: int = 128, workers: int = 0, ece_bins: int = 15, settings: dict | None = None,
                      log=None, progress: bool = False) -> list[dict]:
    """One record per prepared set for ``model`` (see ``eval.cli`` for the fields). ``progress``:
    a bar per set on a terminal, a line every 30 s otherwise (``eval.progress``)."""
    import time
    from open_clip_starft.errors import StarftError
    from open_clip_starft.eval.progress import Progress
    from open_clip_starft.eval.sets import batches
    model.eval()
    heads = HeadCache(model, tokenizer, device, precision)
    heads.prepare(sets)
    scale = float(model.logit_scale.detach().exp()) if getattr(model, "logit_scale", None) is not None else 100.0
    records = []
    for s in sets:
        start = time.perf_counter()
        with Progress(s.num_samples, f"{label} × {s.name}", enabled=progress) as bar:
            logits, labels, groups, skipped = collect_logits(
                model, heads[s], counted(batches(s, preprocess, batch_size, workers), bar), device, precision,
                s.class_map, scale)
        if not len(labels):
            raise StarftError(f"eval set {s.name!r}: no readable image ({len(skipped)} skipped, e.g. "
                              f"{skipped[0] if skipped else 'none'}): check the data")
        m = classification_metrics(logits, labels, groups, ece_bins)
        record = {
            "checkpoint": label, "dataset": s.name,
            "top1": m["top1"], "top5": m["top5"], "worst_group": m["worst_group"], "avg_group": m["avg_group"],
            "groups": {s.group_name(g): acc for g, acc in m["groups"].items()},
            "per_class_mean": m["per_class_mean"],
            "per_class": {s.classnames[c]: acc for c, acc in m["per_class"].items()},
            "ece": m["ece"], "n": m["n"], "skipped": len(skipped),
            "settings": {**(settings or {}), **s.settings, "logit_scale": scale, "precision": precision,
                         "ece_bins": ece_bins, "head_seconds": round(heads.seconds, 3)},
            "seconds": round(time.perf_counter() - start, 3),
        }
        if skipped:
            record["skipped_examples"] = skipped[:5]
        records.append(record)
        if log:
            top5 = "n/a" if m["top5"] is None else f"{100 * m['top5']:.2f}"
            log(f"  {label} × {s.name}: top-1 {100 * m['top1']:.2f}  top-5 {top5}  worst-group "
                f"{100 * m['worst_group']:.2f}  ECE {m['ece']:.4f}  n={m['n']}" + (f"  skipped {len(skipped)}" if skipped else ""))
    return records
