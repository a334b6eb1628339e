"""The one evaluator: a model's zero-shot scores on prepared eval sets, with every metric we report.

``Evaluator(model, tokenizer, preprocess)`` builds each zero-shot head once per weights (OpenCLIP's
``build_zero_shot_classifier`` through ``metrics.HeadCache``; sets that share class names and templates
share it) and scores any ``eval.sets`` set: top-1, top-5, per-class, per-group, worst-group and
average-group accuracy and ECE (``metrics.metrics_of_scores``). ``eval``, ``wise``, ``sweep``, the demo,
the studies and training (``--starft-val``) all evaluate through it, so a model scored on a set gives the
same numbers whichever command asked.

Under ``torch.distributed`` (``distributed=True``), each process scores its share of a set (every
``world``-th image, or shard when there are at least as many shards as processes) and the per-image
scores are gathered: the metrics are computed from counts and exact sums, so N processes give the
numbers of one.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from open_clip_starft.errors import DataError
from open_clip_starft.eval.metrics import HeadCache, SampleScores, collect_logits, metrics_of_scores
from open_clip_starft.eval.progress import Progress
from open_clip_starft.eval.sets import PreparedSet, batches
from open_clip_starft.method.distributed import all_gather_objects


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def share_of(prepared: PreparedSet, rank: int, world: int) -> PreparedSet:
    """The part of ``prepared`` that process ``rank`` of ``world`` scores: every ``world``-th item, or
    shard when there are at least ``world`` shards; else process 0 scores all (the others nothing)."""
    if world == 1:
        return prepared
    if prepared.items is not None:
        return dataclasses.replace(prepared, items=prepared.items[rank::world])
    if len(prepared.shards) >= world:
        shards = prepared.shards[rank::world]
        sizes = None if prepared.shard_sizes is None else {u: prepared.shard_sizes[u] for u in shards}
        return dataclasses.replace(prepared, shards=shards, shard_sizes=sizes)
    return prepared if rank == 0 else dataclasses.replace(prepared, items=[])


def _gather(scores: SampleScores, skipped: list[str], world: int) -> tuple[SampleScores, list[str]]:
    """Every process's scores and skipped names, in rank order (all processes get them all)."""
    if world == 1:
        return scores, skipped
    parts = all_gather_objects((scores, skipped))
    return SampleScores.cat([p[0] for p in parts]), [name for p in parts for name in p[1]]


class Evaluator:
    """Zero-shot evaluation of one model (whose weights may change between calls).

    Args:
        model: an OpenCLIP model (``encode_image``, ``encode_text``, ``logit_scale``); its current weights
            are scored. After changing them, call ``weights_changed()`` (the heads are rebuilt).
        tokenizer, preprocess: the model's tokenizer and eval transform.
        device, precision: where and how the model runs (``fp32``, ``amp``, ``amp_bf16``).
        batch_size, workers: image batches and data-loader workers.
        ece_bins: bins of the expected calibration error.
        cache_images: keep each set's preprocessed batches in memory after the first read, for models
            scored on the same sets many times (sets × images × 3 × H × W floats: small sets only).
        head_model: what the heads' text features come from (``encode_text(tokens, normalize)``): the model
            itself by default; a study with a locked text tower passes one that caches its outputs (exact).
    """

    def __init__(self, model, tokenizer, preprocess, *, device="cpu", precision: str = "fp32", batch_size: int = 128,
                 workers: int = 0, ece_bins: int = 15, cache_images: bool = False, head_model=None):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device, self.precision, self.batch_size, self.workers = device, precision, batch_size, workers
        self.ece_bins, self.cache_images = ece_bins, cache_images
        self.head_model = head_model if head_model is not None else model
        self.heads = HeadCache(self.head_model, tokenizer, device, precision)
        self._images: dict[tuple, list] = {}

    def weights_changed(self) -> None:
        """Drop the heads built from the previous weights."""
        self.heads = HeadCache(self.head_model, self.tokenizer, self.device, self.precision)

    def cached_batches(self, prepared: PreparedSet) -> list:
        """The set's batches (``eval.sets.batches``' form), read once and kept (``cache_images``)."""
        key = (prepared.name, prepared.root, len(prepared.items or ()), tuple(prepared.shards or ()))
        if key not in self._images:
            self._images[key] = list(batches(prepared, self.preprocess, self.batch_size, self.workers))
        return self._images[key]

    def _batches(self, prepared: PreparedSet, bar):
        if self.cache_images:
            source = self.cached_batches(prepared)
        else:
            source = batches(prepared, self.preprocess, self.batch_size, self.workers)
        for batch in source:
            bar.update(len(batch[1]) + len(batch[4]))
            yield batch

    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().exp()) if scale is not None else 100.0

    def logit_bias(self) -> float | None:
        """A SigLIP model's ``logit_bias`` (its probabilities are sigmoids, for ECE); None for CLIP."""
        bias = getattr(self.model, "logit_bias", None)
        return float(bias.detach()) if bias is not None else None

    @torch.no_grad()
    def scores(self, prepared: PreparedSet, *, distributed: bool = False, progress: bool = False,
               label: str = "model") -> tuple[SampleScores, list[str]]:
        """Per-image scores of the model on ``prepared`` and the names of the unreadable images (every
        process's, under ``distributed``). A set with no readable image is a one-line DataError."""
        rank, world = _rank_and_world(distributed)
        part = share_of(prepared, rank, world)
        self.heads.prepare([prepared])
        was_training = self.model.training
        self.model.eval()
        try:
            with Progress(part.num_samples, f"{label} × {prepared.name}", enabled=progress) as bar:
                logits, labels, groups, skipped = collect_logits(
                    self.model, self.heads[prepared], self._batches(part, bar), self.device, self.precision,
                    prepared.class_map, self.logit_scale())
        finally:
            self.model.train(was_training)
        local = SampleScores.from_logits(logits.reshape(len(labels), -1) if len(labels) else
                                         torch.zeros(0, max(prepared.num_classes, 1)), labels, groups,
                                         logit_bias=self.logit_bias())
        scores, skipped = _gather(local, skipped, world)
        if not scores.labels.numel() and not skipped:
            files = prepared.shards or [str(it.ref) for it in prepared.items or ()]
            raise DataError(f"eval set {prepared.name!r} is empty: its {len(files)} file(s) hold no samples "
                            f"({', '.join(files[:3])}{', …' if len(files) > 3 else ''}): check that the files were "
                            "written whole, or leave the set out")
        if not scores.labels.numel():
            raise DataError(f"eval set {prepared.name!r}: no readable image ({len(skipped)} skipped, e.g. "
                            f"{skipped[0] if skipped else 'none'}): check the data")
        return scores, skipped

    def evaluate(self, prepared: PreparedSet, *, label: str = "model", settings: dict | None = None,
                 distributed: bool = False, progress: bool = False) -> dict:
        """One record of the model on ``prepared``: ``checkpoint`` (``label``), ``dataset``, ``top1``, ``top5``,
        ``worst_group``, ``avg_group``, ``groups`` {group name: acc}, ``per_class_mean``, ``per_class``
        {class name: acc}, ``ece``, ``n``, ``skipped`` (+ ``skipped_examples``), ``settings``, ``seconds``."""
        start = time.perf_counter()
        scores, skipped = self.scores(prepared, distributed=distributed, progress=progress, label=label)
        m = metrics_of_scores(scores, self.ece_bins)
        record = {
            "checkpoint": label, "dataset": prepared.name,
            "top1": m["top1"], "top5": m["top5"], "worst_group": m["worst_group"], "avg_group": m["avg_group"],
            "groups": {prepared.group_name(g): acc for g, acc in m["groups"].items()},
            "per_class_mean": m["per_class_mean"],
            "per_class": {prepared.classnames[c]: acc for c, acc in m["per_class"].items()},
            "ece": m["ece"], "n": m["n"], "skipped": len(skipped),
            "settings": {**(settings or {}), **prepared.settings, "logit_scale": self.logit_scale(),
                         "precision": self.precision, "ece_bins": self.ece_bins,
                         "head_seconds": round(self.heads.seconds, 3),
                         # a SigLIP model: its ECE is of its sigmoid probabilities σ(logit + bias)
                         **({"logit_bias": self.logit_bias()} if self.logit_bias() is not None else {})},
            "seconds": round(time.perf_counter() - start, 3),
        }
        if skipped:
            record["skipped_examples"] = skipped[:5]
        return record

    def evaluate_sets(self, sets: list[PreparedSet], *, label: str = "model", settings: dict | None = None,
                      distributed: bool = False, progress: bool = False, log=None) -> list[dict]:
        """``evaluate`` on every set (heads built once for all of them); ``log(line)`` per set."""
        self.heads.prepare(sets)
        records = []
        for prepared in sets:
            record = self.evaluate(prepared, label=label, settings=settings, distributed=distributed,
                                   progress=progress)
            records.append(record)
            if log:
                log(summary_line(record))
        return records


def summary_line(record: dict) -> str:
    """``  LABEL × SET: top-1 …  top-5 …  worst-group …  ECE …  n=…  (PRECISION)`` (percentages)."""
    top5 = "n/a" if record["top5"] is None else f"{100 * record['top5']:.2f}"
    return (f"  {record['checkpoint']} × {record['dataset']}: top-1 {100 * record['top1']:.2f}  top-5 {top5}  "
            f"worst-group {100 * record['worst_group']:.2f}  ECE {record['ece']:.4f}  n={record['n']}  "
            f"({record['settings'].get('precision', '?')})"
            + (f"  skipped {record['skipped']}" if record["skipped"] else ""))
