"""Evaluation during training (``--starft-val``): the robustness metrics on named sets, logged as
upstream logs its own, and the best epoch chosen (``--starft-select``).

It is built by ``open_clip_starft.main`` and handed to the training step (``host`` and ``eval`` never
import each other); the step calls ``start``, ``after_step`` and ``end_epoch`` and writes ``best.pt``
with its one checkpoint writer when ``end_epoch`` reports a new best.

``TrainingValidation(args, model)`` prepares every ``--starft-val NAME=ROOT`` set before the first step
(a bad set stops the run there, in one line) and scores the student through the one evaluator
(``eval.evaluator.Evaluator``, the eval transform of the model's own preprocessing config):

- before the first step of a new run (``epoch 0``: the zero-shot model, so the log starts at the baseline);
- after every ``--starft-val-frequency`` epochs (and the last), and every ``--starft-val-steps`` steps;
- each evaluation: ``val/NAME/METRIC`` (top1, top5, worst_group, avg_group, per_class_mean, ece) to the
  text log, tensorboard (``args.tensorboard_path``, x = the global step) and wandb, and one JSON line per
  set to the run's ``checkpoints/results.jsonl`` (upstream's file) with ``epoch``, ``step`` and ``set``;
- with ``--starft-select NAME:METRIC``, an epoch-end evaluation that beats the best so far (ties broken by
  the set's top-1) is returned by ``end_epoch`` (the step saves ``checkpoints/best.pt`` with ``starft_best``
  inside: the epoch, step, metric and value) and recorded in ``checkpoints/best.json``; a resumed run reads
  the best so far back. A group metric on a set without groups is refused before the first step; a resumed run
  with another selection than the one that kept ``best.pt`` is refused in one line.

Every process scores its share of each set and the scores are gathered (N processes give the numbers of
one); only the master process writes. The training's random state (Python, NumPy, torch) is saved and
restored around each evaluation, so a run with ``--starft-val`` trains exactly as one without it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random

import numpy as np
import open_clip
import torch

from open_clip_starft.data.files import atomic_open, json_line, read_json, write_json
from open_clip_starft.errors import ConfigError
from open_clip_starft.eval.evaluator import Evaluator
from open_clip_starft.eval.report import ScalarReporter, record_scalars
from open_clip_starft.eval.sets import EvalSetSpec, prepare_set
from open_clip_starft.eval.sets.workers import default_workers

METRICS = ("top1", "top5", "worst_group", "avg_group", "per_class_mean", "ece")
"""The metrics logged per set; all are higher-is-better but ``ece``."""
GROUP_METRICS = ("worst_group", "avg_group")
"""The metrics that equal top-1 on a set with one group: selecting on them needs a set with groups."""
BEST_FILE, BEST_RECORD = "best.pt", "best.json"
"""Names in the run's checkpoints folder: the best epoch's weights (written by the step) and its record."""


def parse_val_sets(items: list[str]) -> list[tuple[str, str]]:
    """``NAME=ROOT`` items as ``(name, root)``; names unique."""
    sets = []
    for item in items:
        name, sep, root = item.partition("=")
        if not sep or not name or not root:
            raise ConfigError(f"--starft-val {item!r}: write NAME=ROOT, e.g. val=/data/val-{{0..3}}.tar")
        if name in dict(sets):
            raise ConfigError(f"--starft-val names {name!r} twice: give each set its own name")
        sets.append((name, root))
    return sets


def parse_select(select: str | None, names: list[str]) -> tuple[str, str] | None:
    """``NAME:METRIC`` of ``--starft-select`` as ``(name, metric)``, checked against the sets."""
    if select is None:
        return None
    name, sep, metric = select.rpartition(":")
    if not sep or name not in names or metric not in METRICS:
        raise ConfigError(f"--starft-select {select!r}: write NAME:METRIC with NAME one of the --starft-val sets "
                          f"({', '.join(names) or 'none given'}) and METRIC one of {', '.join(METRICS)}")
    return name, metric


def eval_transform(model):
    """The model's eval transform, from its own preprocessing config (what ``create_model_and_transforms``
    gives as ``preprocess_val``)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                                     resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
                                     fill_color=cfg.get("fill_color", 0))


class _RandomState:
    """Python's, NumPy's and torch's random state, saved on entry and restored on exit."""

    def __enter__(self):
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                       torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def __exit__(self, *exc):
        python, numpy_state, cpu, cuda = self.states
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def better(value: float, top1: float, best: dict | None, metric: str) -> bool:
    """Whether ``(value, top1)`` beats the best record so far (lower is better for ``ece``; ties: top-1)."""
    if best is None:
        return True
    sign = -1 if metric == "ece" else 1
    return (sign * value, top1) > (sign * best["value"], best["top1"])


class TrainingValidation:
    """The ``--starft-val`` sets of one run (see the module docstring); built from ``(args, model,
    preprocess_val)`` (the model as created; DDP and compile share its parameters)."""

    def __init__(self, args, model, preprocess=None):
        self.sets = parse_val_sets(args.starft_val)
        self.select = parse_select(args.starft_select, [name for name, _ in self.sets])
        if args.starft_val_frequency < 1 or args.starft_val_steps < 0:
            raise ConfigError("--starft-val-frequency must be ≥ 1 and --starft-val-steps ≥ 0")
        classnames = args.starft_val_classnames or args.starft_classnames
        templates = args.starft_val_templates or args.starft_templates
        self.prepared = [prepare_set(EvalSetSpec(name=name, root=root, classnames=classnames, templates=templates))
                         for name, root in self.sets]
        for p in self.prepared:
            if p.describe_missing_classes():
                logging.info(f"StarFT: --starft-val set {p.name!r}{p.describe_missing_classes()}")
        self.evaluator = Evaluator(model, open_clip.get_tokenizer(args.model, cache_dir=args.cache_dir),
                                   preprocess or eval_transform(model), device=args.device, precision=args.precision,
                                   batch_size=args.batch_size, workers=min(args.workers, default_workers(2)))
        self.model, self.frequency, self.every_steps = model, args.starft_val_frequency, args.starft_val_steps
        self.args = args  # upstream's: its log folders are set after the model is created
        self.best: dict | None = None
        self._reporter: ScalarReporter | None = None
        self._started = False

    @property
    def folder(self) -> str | None:
        """The run's checkpoints folder where this process writes (the master's), else None."""
        return self.args.checkpoint_path if getattr(self.args, "save_logs", False) else None

    @property
    def active(self) -> bool:
        return bool(self.sets)

    # -- when ---------------------------------------------------------------------------------------
    def start(self, epoch: int, start_batch: int, args) -> None:
        """At the start of every epoch; the first time: a resumed run reads back its best so far and its
        selection is checked against the run's (``check_resumed_selection``); a new run scores the zero-shot
        model (epoch 0) and checks that the selected set has the groups its metric needs, before the first step."""
        if self._started:
            return
        self._started = True
        if args.resume:  # a resumed run continues from the best so far: the master's, on every process
            self.best = _from_master(read_json(os.path.join(self.folder, BEST_RECORD)) if self.folder else None, args)
            if self.active:
                self.check_resumed_selection(_from_master(self._history(), args))
        elif self.active and epoch == 0 and start_batch == 0:
            records = self.evaluate(epoch=0, step=0, args=args)
            if self.select is not None:
                self._check_groups(records[self.select[0]]["groups"])

    def _history(self) -> list[dict]:
        """The run's logged evaluations (``results.jsonl``, this process's folder), oldest first."""
        path = os.path.join(self.folder, "results.jsonl") if self.folder else None
        if not path or not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def check_resumed_selection(self, history: list[dict]) -> None:
        """Refuse, in one line, a resumed run whose ``--starft-select`` differs from the one that kept its
        ``best.pt`` (another set or metric: its stored best value is not comparable, and the epochs already
        done would never be compared on the new metric), or that adds a selection to a run already validated
        at an epoch's end without one; refuse a group metric when the logged evaluations of its set had one group."""
        if self.select is None:
            return
        name, metric = self.select
        wanted = f"{name}:{metric}"
        remedy = ("to choose an epoch on another metric, read checkpoints/results.jsonl (every evaluation is logged) "
                  "and score that epoch with `open-clip-starft eval --run DIR --epochs N`")
        if self.best is not None and (self.best.get("set"), self.best.get("metric")) != (name, metric):
            kept = f"{self.best.get('set')}:{self.best.get('metric')}"
            raise ConfigError(f"--starft-select {wanted}: this run kept best.pt by {kept} (epoch {self.best.get('epoch')}, "
                              f"{self.best.get('value')}), a value another metric cannot be compared with: resume with "
                              f"--starft-select {kept}, or {remedy}")
        ends = sorted({r["epoch"] for r in history if r.get("set") == name and isinstance(r.get("epoch"), int)
                       and r["epoch"] >= 1})
        if self.best is None and ends:
            raise ConfigError(f"--starft-select {wanted}: this run was validated after epoch(s) {', '.join(map(str, ends))} "
                              "without a selection, so those epochs would never be candidates for best.pt: resume "
                              f"without --starft-select, or {remedy}")
        logged = [r for r in history if r.get("set") == name and isinstance(r.get("groups"), dict)]
        if logged:
            self._check_groups(logged[-1]["groups"])

    def _check_groups(self, groups: dict) -> None:
        """A group metric (worst or average group) needs a set with more than one group: with one it is top-1."""
        name, metric = self.select
        if metric in GROUP_METRICS and len(groups) <= 1:
            raise ConfigError(f"--starft-select {name}:{metric}: the --starft-val set {name!r} has no groups (every image "
                              f"in one group), where {metric} is top-1: give its samples groups (a 'group' key in "
                              "shards, a CSV group column, domain folders) or select on top1")

    def after_step(self, step: int, epoch: int, batches_done: int, num_batches: int, args) -> None:
        """Every ``--starft-val-steps`` optimizer steps (``step``: steps done), not at an epoch's end."""
        if self.active and self.every_steps and step % self.every_steps == 0 and batches_done < num_batches:
            self.evaluate(epoch=round(epoch + batches_done / num_batches, 4), step=step, args=args)

    def end_epoch(self, epoch: int, step: int, args) -> dict | None:
        """After epoch ``epoch`` (0-based) every ``--starft-val-frequency`` epochs and the last: evaluate;
        with ``--starft-select``, return the new best record (``epoch`` = epochs done, ``step``, ``set``,
        ``metric``, ``value``, ``top1``) when this epoch beats the best so far, else None."""
        done = epoch + 1
        if not self.active or (done % self.frequency and done != args.epochs):
            return None
        records = self.evaluate(epoch=done, step=step, args=args)
        return self._new_best(records, done, step, args) if self.select is not None else None

    # -- what -----------------------------------------------------------------------------------------
    def evaluate(self, *, epoch, step: int, args) -> dict:
        """Score every set with the current weights; log and record; returns ``{name: record}``."""
        self.evaluator.weights_changed()
        with _RandomState():
            records = {p.name: self.evaluator.evaluate(p, label=f"epoch {epoch}", distributed=args.distributed)
                       for p in self.prepared}
        if _is_master(args):
            self._log(records, epoch, step, args)
        return records

    def _log(self, records: dict, epoch, step: int, args) -> None:
        scalars = {k: v for r in records.values() for k, v in record_scalars(r, "val", METRICS).items()}
        logging.info(f"StarFT val epoch {epoch} step {step}: "
                     + "  ".join(f"{k}: {v:.4f}" for k, v in scalars.items()))
        if self.folder:  # a resumed run replaces the lines a killed run logged at or after this step (lost)
            path = os.path.join(self.folder, "results.jsonl")
            with open(path, "a+", encoding="utf-8") as f:
                f.seek(0)
                kept = [line for line in f.read().splitlines() if not _logged_from(line, step)]
            with atomic_open(path) as f:
                f.writelines(line + "\n" for line in kept)
                for name, r in records.items():
                    line = {"epoch": epoch, "step": step, "set": name, **{m: r[m] for m in METRICS},
                            "groups": r["groups"], "n": r["n"], "skipped": r["skipped"]}
                    f.write(json_line(line))
        if self._reporter is None:  # upstream has set up tensorboard's folder and wandb's run by now
            self._reporter = ScalarReporter(",".join(t for t in ("tensorboard", "wandb") if getattr(args, t, False)),
                                            getattr(args, "tensorboard_path", None), filename_suffix=".starft-val")
        self._reporter.log(scalars, step, extra={"epoch": epoch})

    def _new_best(self, records: dict, epoch: int, step: int, args) -> dict | None:
        name, metric = self.select
        self._check_groups(records[name]["groups"])
        value, top1 = records[name][metric], records[name]["top1"]
        if value is None or not math.isfinite(value) or not better(value, top1, self.best, metric):
            return None
        self.best = {"epoch": epoch, "step": step, "set": name, "metric": metric, "value": value, "top1": top1}
        return dict(self.best)

    def best_saved(self, args) -> None:
        """Record the best so far (``best.json``) once the step has written its weights (``best.pt``)."""
        if _is_master(args) and self.folder and self.best is not None:
            write_json(os.path.join(self.folder, BEST_RECORD), self.best)


def _logged_from(line: str, step: int) -> bool:
    """True for a ``results.jsonl`` line of ours (with ``set``) logged at global step ``step`` or later."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "set" in record and record.get("step", -1) >= step


def _is_master(args) -> bool:
    return getattr(args, "rank", 0) == 0


def _from_master(value, args):
    """``value`` as the master process has it, on every process (the best so far must agree everywhere:
    each process calls the step's ``best.pt`` writer, which waits for all of them)."""
    if not getattr(args, "distributed", False):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
