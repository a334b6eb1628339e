"""``open-clip-starft sweep``: StarFT over a grid of settings, chosen on a validation set you name.

    open-clip-starft sweep --out sweep/ --model local-dir:zs --classnames classes.txt \\
        --val '/data/val/shard-{000000..000015}.tar' --val-in-dist /data/val-id.tar \\
        --test /data/test.tar --test-in-dist /data/test-id.tar \\
        --lambdas 0.5,1,2,4,8 --schedules linear,staircase,constant --concepts background --concepts my.txt \\
        --wise-alphas 0:1:0.1 -- --train-data '/data/train-{0000..0099}.tar' --dataset-type webdataset \\
        --batch-size 64 --epochs 6 --lr 1e-5 --wd 0.1 --warmup 10

Runs ``open_clip_starft.main`` once per setting (λ × schedule × descriptor set, and FLYP, λ = 0)
with the training flags after ``--``, each as ``OUT/runs/NAME``. Every input path (sets, class names,
descriptor files, model, the first training shard) is checked before anything is trained.

A rerun into the same ``--out`` reuses a finished run only when it was trained with the settings
asked for now (its ``params.txt``, and the content of the files they name: class names, descriptor
files, the model's folder or weights; ``tools.sweep_reuse``); an unfinished one with equal settings
resumes from its latest checkpoint. A cached score (``OUT/evals.json``) is reused only when the model,
the checkpoint's content, the sets (root and format) and the class names' content are the same. Any
other difference is refused in one line naming it, or with ``--on-mismatch rerun`` the run is moved
to ``OUT/stale/NAME.N`` and trained again (the score evaluated again); nothing is deleted.

Every run and the zero-shot model are evaluated zero-shot (``eval``'s functions) on the validation
set (accuracy and worst-group accuracy), the optional validation in-distribution set, and the
optional test sets. The choice uses validation only: the StarFT setting with the best validation
worst-group accuracy; ties go to the higher validation in-distribution accuracy (else validation
accuracy), then to the earlier setting of the grid. Test numbers are recorded beside it and never
read by the choice. ``--wise-alphas`` adds the WiSE-FT curves zero-shot→FLYP and zero-shot→selected
StarFT (on the test sets) and the frontier comparison (``eval.frontier``).

Writes ``OUT/sweep.json`` (the whole grid, the choice and the curves), ``OUT/evals.json``,
``OUT/runs.json`` (what each run was started with), ``OUT/fingerprints.json`` (file hashes) and, with
``--wise-alphas``, ``OUT/frontier.png``, all through ``data.files``; prints the grid's table. On a
cluster, ``--only-run I`` trains setting I alone (``scripts/slurm/sweep_select.sbatch`` submits the
grid as a job array, then the choosing sweep).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Callable

from braceexpand import braceexpand

from open_clip_starft.data.files import merge_json, read_json, write_json
from open_clip_starft.data.samples import is_local_url
from open_clip_starft.errors import ConfigError, DataError, StarftError, one_line_errors, with_flag
from open_clip_starft.eval.frontier import matched_worst_group, plot_frontiers, wise_curve
from open_clip_starft.eval.sets import EvalSetSpec, prepare_set
from open_clip_starft.eval.wise import parse_alphas
from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.tools.stages import run_stage
from open_clip_starft.tools.sweep_reuse import (FINGERPRINTS, Fingerprints, content_differences, content_of,
                                                expected_params, key_differences, params_differences, record_run,
                                                run_records, summary)

# ``eval.models`` and ``eval.evaluator`` (torch, open_clip) are imported by the code that trains and scores, so
# the parser and the one-line refusals of bad flags answer at once.

logger = logging.getLogger(__name__)
MISMATCH = ("refuse", "rerun")
"""--on-mismatch: what a rerun into the same --out does with a run or cached score made otherwise."""

ROLES = ("val", "val_in_dist", "test", "test_in_dist")  # --val, --val-in-dist, --test, --test-in-dist
_METRICS = {"val_avg": ("val", "top1"), "val_worst_group": ("val", "worst_group"), "val_in_dist": ("val_in_dist", "top1"),
            "avg": ("test", "top1"), "worst_group": ("test", "worst_group"), "in_dist": ("test_in_dist", "top1"),
            "val_groups": ("val", "groups"), "groups": ("test", "groups")}
"""A sweep row's metrics: name → (role of the set, field of the evaluator's record)."""
CRITERION = ("the StarFT setting with the highest validation worst-group accuracy; ties: the higher validation "
             "in-distribution accuracy (validation accuracy without --val-in-dist), then the earlier grid setting; "
             "test sets are never read")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One fine-tune of the grid: λ, schedule and descriptor set (FLYP: λ = 0, neither)."""
    lam: float
    schedule: str | None = None
    descriptors: str | None = None

    @property
    def method(self) -> str:
        return "flyp" if self.lam == 0 else "starft"

    @property
    def name(self) -> str:
        if self.lam == 0:
            return "flyp"
        tag = os.path.splitext(os.path.basename(self.descriptors))[0]
        return f"starft-lam{self.lam:g}-{self.schedule}-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in tag)}"

    def train_args(self) -> list[str]:
        if self.lam == 0:
            return ["--starft-lambda", "0"]
        return ["--starft-lambda", f"{self.lam:g}", "--starft-schedule", self.schedule, "--starft-concepts", self.descriptors]


def make_grid(lambdas: list[float], schedules: list[str], concepts: list[str], flyp: bool = True) -> list[Setting]:
    """FLYP first (when ``flyp``), then every λ > 0 × schedule × descriptor set, in that order."""
    grid = [Setting(0.0)] if flyp else []
    grid += [Setting(lam, s, c) for lam in lambdas if lam > 0 for s in schedules for c in concepts]
    names = [g.name for g in grid]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two grid settings share the run name {dup!r}: give descriptor files distinct names")
    return grid


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: write a comma list of numbers, e.g. 0.5,1,2,4,8") from None
    if not values or any(not (v >= 0 and v != float("inf")) for v in values):
        raise ConfigError(f"{flag} {text!r}: every value must be finite and ≥ 0")
    return values


def train_epochs(train_args: list[str]) -> int:
    """The ``--epochs`` of the training flags (OpenCLIP's default 32)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--epochs", type=int, default=32)
    for flag in ("--logs", "--name", "--model", "--starft-lambda", "--starft-schedule", "--starft-concepts",
                 "--starft-classnames", "--pretrained"):
        parser.add_argument(flag)
    known, _ = parser.parse_known_args(train_args)
    for flag in ("logs", "name", "model", "starft_lambda", "starft_schedule", "starft_concepts", "starft_classnames",
                 "pretrained"):
        if getattr(known, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} after '--': the sweep sets it (use its own --out, --model, "
                              "--pretrained, --classnames and grid flags)")
    return known.epochs


@dataclasses.dataclass
class SweepContext:
    """What every step of one sweep reads: its folder, the zero-shot model, the class names, the runs'
    training flags, what to do with a run trained otherwise (``on_mismatch``) and where progress goes."""
    out: str
    model: str
    pretrained: str | None
    classnames: str
    train_args: list[str]
    threads: int = 1
    on_mismatch: str = "refuse"
    report: Callable[[str], None] = logger.info
    validation: list[str] = dataclasses.field(default_factory=list)  # --choose-epoch: each run's --starft-val flags

    def __post_init__(self):
        self.epochs = train_epochs(self.train_args)
        self.fingerprints = Fingerprints(os.path.join(self.out, FINGERPRINTS))

    @property
    def logs(self) -> str:
        return os.path.join(self.out, "runs")

    def run_dir(self, setting: Setting) -> str:
        return os.path.join(self.logs, setting.name)

    def final_checkpoint(self, setting: Setting) -> str:
        return os.path.join(self.run_dir(setting), "checkpoints", f"epoch_{self.epochs}.pt")

    def run_argv(self, setting: Setting) -> list[str]:
        """The training flags of ``setting``'s run, without where it is logged (``--logs``, ``--name``,
        ``--resume``)."""
        train = setting.train_args()
        if setting.descriptors is not None:
            train[train.index("--starft-concepts") + 1] = absolute_files(setting.descriptors)
        return ["--model", self.model, *(["--pretrained", self.pretrained] if self.pretrained else []),
                "--starft-classnames", self.classnames, *train, *self.validation, *self.train_args]

    def scored_checkpoint(self, setting: Setting) -> str:
        """The checkpoint a setting is scored by: its last epoch, or with ``--choose-epoch`` its best
        validation epoch (``best.pt``)."""
        if self.validation:
            return os.path.join(self.run_dir(setting), "checkpoints", "best.pt")
        return self.final_checkpoint(setting)

    def model_fingerprint(self) -> str:
        """The zero-shot model: its name and, where they are files, the content of its folder or weights."""
        parts = [self.model, self.pretrained or ""]
        return "|".join(self.fingerprints.of_value(p) or p for p in parts)


def absolute_files(spec: str) -> str:
    """A value naming files (a file, ``local-dir:DIR``, a comma list with files) with each existing
    file or folder made absolute, so a run's recorded settings do not depend on the working folder."""
    if spec.startswith("local-dir:"):
        return "local-dir:" + os.path.abspath(spec[len("local-dir:"):])
    return ",".join(os.path.abspath(p) if os.path.exists(p) else p for p in spec.split(","))


def run_differences(ctx: SweepContext, setting: Setting, defaults: dict[str, str]) -> list[str]:
    """How the run folder of ``setting`` differs from what this sweep would train: settings in its
    ``params.txt``, the content of the files they name, and its final checkpoint since this sweep
    trained it. Empty when it matches (or has neither settings nor checkpoints yet)."""
    run_dir = ctx.run_dir(setting)
    expected = expected_params(ctx.run_argv(setting))
    params = os.path.join(run_dir, "params.txt")
    if not os.path.isfile(params):
        saved = os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(os.path.join(run_dir, "checkpoints"))
        return ["no params.txt, so its settings are unknown"] if saved else []
    record = run_records(ctx.out).get(setting.name)
    diffs = params_differences(params, expected, defaults)
    diffs += content_differences(record, content_of(expected, ctx.fingerprints), expected)
    final = ctx.final_checkpoint(setting)
    if record and record.get("checkpoint") and os.path.isfile(final):
        if ctx.fingerprints.file(final) != record["checkpoint"]:
            diffs.append(f"{os.path.basename(final)} replaced since this sweep trained it")
    return diffs


def move_aside(ctx: SweepContext, setting: Setting) -> str:
    """Move a run trained otherwise (and its console log) to ``OUT/stale/NAME.N``; nothing is deleted."""
    stale = os.path.join(ctx.out, "stale")
    os.makedirs(stale, exist_ok=True)
    n = 1
    while os.path.exists(os.path.join(stale, f"{setting.name}.{n}")):
        n += 1
    target = os.path.join(stale, f"{setting.name}.{n}")
    os.rename(ctx.run_dir(setting), target)
    console = os.path.join(ctx.logs, f"{setting.name}.console.txt")
    if os.path.isfile(console):
        os.rename(console, target + ".console.txt")
    record_run(ctx.out, setting.name, None)
    return target


def plan_run(ctx: SweepContext, setting: Setting, defaults: dict[str, str]) -> str:
    """``reuse`` (finished with the same settings), ``resume`` (unfinished, same settings) or ``train``
    (no run yet, or one trained otherwise that ``--on-mismatch rerun`` moved aside; ``refuse`` raises)."""
    if not os.path.isdir(ctx.run_dir(setting)):
        return "train"
    diffs = run_differences(ctx, setting, defaults)
    if diffs and ctx.on_mismatch == "refuse":
        raise ConfigError(f"run {ctx.run_dir(setting)} was trained with other settings: {summary(diffs)}: pass "
                          "--on-mismatch rerun to train it again (the old run is moved under OUT/stale/), or another --out")
    if diffs:
        moved = move_aside(ctx, setting)
        ctx.report(f"  {setting.name}: trained with other settings ({summary(diffs)}): moved to {moved}, trained again")
        return "train"
    return "reuse" if os.path.isfile(ctx.final_checkpoint(setting)) else "resume"


def plan_runs(ctx: SweepContext, grid: list[Setting]) -> dict[str, str]:
    """``plan_run`` of every setting, before anything is trained (a refusal comes first)."""
    defaults = expected_params(["--model", ctx.model])
    return {s.name: plan_run(ctx, s, defaults) for s in grid}


def train_run(ctx: SweepContext, setting: Setting, plan: str) -> str:
    """Train (or resume, or with plan ``reuse`` just name) ``setting``'s run; returns its last checkpoint.
    The content of the files its settings name is recorded before it starts, its checkpoint's after."""
    final = ctx.final_checkpoint(setting)
    if plan == "reuse":
        ctx.report(f"  {setting.name}: finished run found with the same settings, not rerun")
        return ctx.scored_checkpoint(setting)
    entry = {"content": content_of(expected_params(ctx.run_argv(setting)), ctx.fingerprints)}
    record_run(ctx.out, setting.name, entry)
    args = [*ctx.run_argv(setting), "--logs", ctx.logs, "--name", setting.name,
            *(["--resume", "latest"] if plan == "resume" else [])]
    seconds = run_stage("open_clip_starft.main", args, os.path.join(ctx.logs, f"{setting.name}.console.txt"),
                        what=f"sweep run {setting.name}", threads=ctx.threads)
    if not os.path.isfile(final):
        from open_clip_starft.eval.models import run_checkpoints
        found = run_checkpoints(ctx.run_dir(setting), "last")
        raise ConfigError(f"run {setting.name} ended without {final} (last: {found[-1]}): check --save-frequency")
    record_run(ctx.out, setting.name, {**entry, "checkpoint": ctx.fingerprints.file(final)})
    ctx.report(f"  {setting.name}: trained in {seconds:.0f} s")
    return ctx.scored_checkpoint(setting)


def run_setting(setting: Setting, ctx: SweepContext) -> str:
    """Train ``setting`` as ``OUT/runs/NAME`` unless a finished run with its settings is there; returns
    its last checkpoint."""
    return train_run(ctx, setting, plan_run(ctx, setting, expected_params(["--model", ctx.model])))


class WeightsScorer:
    """Zero-shot metrics of weights on the named sets, by role: ``val_avg``, ``val_worst_group``,
    ``val_in_dist`` (top-1 of the validation in-distribution set), ``avg``, ``worst_group`` and
    ``in_dist`` (the test sets); a role without a set gives None. Scores through the one evaluator
    (``eval.evaluator.Evaluator``); with ``cache_images`` the preprocessed images of every set are read once
    and kept in memory for every later model (sets × images × 3 × H × W floats: for small sets)."""

    def __init__(self, model: str, pretrained: str | None, sets: dict[str, str], classnames: str,
                 device: str = "cpu", batch_size: int = 256, cache_images: bool = False, prepared: dict | None = None):
        from open_clip_starft.eval.evaluator import Evaluator
        from open_clip_starft.eval.models import check_weights_value, create_model, load_weights
        self.model_name = model
        if pretrained:
            check_weights_value(pretrained, model)  # a file, or a tag OpenCLIP knows for a model name
        tag = pretrained if pretrained and not os.path.isfile(pretrained) else None
        self.model, preprocess, tokenizer = create_model(model, device, tag)
        if pretrained and not tag:
            load_weights(self.model, pretrained, model)
        self.zero_shot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.prepared = prepared if prepared is not None else {
            role: prepare_set(EvalSetSpec(name=role, root=root, classnames=classnames)) for role, root in sets.items()}
        self.evaluator = Evaluator(self.model, tokenizer, preprocess, device=device, batch_size=batch_size,
                                   cache_images=cache_images)

    def state_dict(self, checkpoint: str | None) -> dict:
        """The weights of a checkpoint file (None: the zero-shot model's)."""
        if checkpoint is None:
            return self.zero_shot
        from open_clip_starft.eval.models import load_weights
        load_weights(self.model, checkpoint, self.model_name)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def __call__(self, state_dict: dict, roles: tuple[str, ...] = ROLES) -> dict:
        """Metrics of ``state_dict`` on the sets of ``roles`` (the others give None)."""
        self.model.load_state_dict(state_dict)
        self.evaluator.weights_changed()
        by_role = {}
        for role, prepared in self.prepared.items():
            if role not in roles:
                continue
            record = self.evaluator.evaluate(prepared, label=role)
            if record["skipped"]:
                raise DataError(f"--{role.replace('_', '-')} {prepared.root}: {record['skipped']} unreadable image(s), "
                                f"e.g. {record['skipped_examples'][0]}: a sweep compares runs on whole sets only")
            by_role[role] = record
        return {name: by_role[role][key] if role in by_role else None for name, (role, key) in _METRICS.items()}


def select(rows: list[dict]) -> dict:
    """The validation choice among the StarFT rows (λ > 0), by ``CRITERION``; reads no test field."""
    starft = [r for r in rows if r["lam"]]
    if not starft:
        raise ConfigError("no StarFT setting in the grid: give --lambdas with a value above 0")
    return max(starft, key=_choice_order)  # max keeps the first of equals


def _choice_order(row: dict) -> tuple[float, float]:
    """Validation worst group, then validation in-distribution accuracy (else validation accuracy)."""
    return row["val_worst_group"], row["val_in_dist"] if row["val_in_dist"] is not None else row["val_avg"]


def frontier(rows: list[dict], wise: dict[str, list[dict]], x: str = "in_dist") -> dict:
    """The selected StarFT's test worst group minus WiSE-FT(FLYP)'s at its test in-distribution
    accuracy (``x``: ``in_dist``, else ``avg`` without a test in-distribution set)."""
    chosen = next(r for r in rows if r.get("selected"))
    curve = [{"in_dist": p[x], "worst_group": p["worst_group"]} for p in wise["flyp"]]
    matched, clamped = matched_worst_group(curve, chosen[x])
    flyp = next(r for r in rows if r["method"] == "flyp")
    return {"x": x, "starft_minus_wise": chosen["worst_group"] - matched, "wise_matched_worst_group": matched,
            "clamped": clamped, "starft_minus_flyp": chosen["worst_group"] - flyp["worst_group"],
            "starft_minus_flyp_in_dist": chosen[x] - flyp[x]}


WISE_ROLES = ("test", "test_in_dist")
"""The roles the WiSE-FT curves are evaluated on."""


class ScoreCache:
    """``OUT/evals.json``: metrics by ``LABEL@ALPHA``, each with the key it was computed under
    (``score_key``); a score is read back only under an equal key."""

    def __init__(self, path: str):
        self.path = path
        self.entries = read_json(path, {})

    def get(self, name: str, key: dict) -> dict | None:
        entry = self.entries.get(name)
        return entry["metrics"] if isinstance(entry, dict) and entry.get("key") == key else None

    def stale(self, name: str, key: dict) -> list[str]:
        """How the cached score ``name`` differs from ``key`` (empty: none cached, or equal)."""
        entry = self.entries.get(name)
        return [] if entry is None else key_differences(entry.get("key") if isinstance(entry, dict) else None, key)

    def put(self, name: str, key: dict, metrics: dict) -> None:
        self.entries[name] = {"key": key, "metrics": metrics}
        merge_json(self.path, {name: self.entries[name]})


def score_key(ctx: SweepContext, sets: dict[str, dict], checkpoint: str | None, alpha: float | None,
              roles: tuple[str, ...]) -> dict:
    """What a score depends on: the zero-shot model, the checkpoint's content, α, each set's root and
    format, and the class names' content."""
    return {"model": ctx.model_fingerprint(), "alpha": alpha,
            "checkpoint": None if checkpoint is None else ctx.fingerprints.file(checkpoint),
            "sets": {role: sets[role] for role in roles if role in sets},
            "classnames": ctx.fingerprints.of_value(ctx.classnames) or ctx.classnames}


def check_cached_scores(ctx: SweepContext, cache: ScoreCache, sets: dict[str, dict], reused: dict[str, str | None],
                        alphas: list[float]) -> None:
    """Before training: every cached score of the zero-shot model and of the reused runs (``reused``:
    label → checkpoint) that no longer matches is refused in one line, or with ``--on-mismatch rerun``
    evaluated again. (Scores of runs trained now are evaluated again anyway.)"""
    for label, checkpoint in reused.items():
        for alpha in [None, *alphas]:
            roles = ROLES if alpha is None else WISE_ROLES
            diffs = cache.stale(f"{label}@{alpha}", score_key(ctx, sets, checkpoint, alpha, roles))
            if diffs and ctx.on_mismatch == "refuse":
                raise ConfigError(f"{cache.path}: the cached score of {label}{'' if alpha is None else f' at α {alpha:g}'} "
                                  f"was computed otherwise: {summary(diffs)}: pass --on-mismatch rerun to evaluate it "
                                  "again, or another --out")
            if diffs:
                ctx.report(f"  {label}: cached score computed otherwise ({summary(diffs)}): evaluated again")


def evaluate_weights(evaluator: WeightsScorer, checkpoint: str | None, weights: dict | None, roles: tuple[str, ...]) -> dict:
    """The one call into the evaluator: metrics of ``weights`` (else the checkpoint's, else the
    zero-shot model's) on the sets of ``roles``."""
    return evaluator(weights if weights is not None else evaluator.state_dict(checkpoint), roles)


@dataclasses.dataclass
class Scoring:
    """The evaluation side of a sweep: its context, the evaluator, the score cache and each set's key
    (root and format, by role)."""
    ctx: SweepContext
    evaluator: WeightsScorer
    cache: ScoreCache
    sets: dict[str, dict]


def score(scoring: Scoring, label: str, checkpoint: str | None, alpha: float | None = None,
          weights: dict | None = None, roles: tuple[str, ...] = ROLES) -> dict:
    """The metrics of ``label`` (at WiSE-FT ``alpha``): from the cache under an equal key, else evaluated
    and cached."""
    key = score_key(scoring.ctx, scoring.sets, checkpoint, alpha, roles)
    metrics = scoring.cache.get(f"{label}@{alpha}", key)
    if metrics is None:
        metrics = evaluate_weights(scoring.evaluator, checkpoint, weights, roles)
        scoring.cache.put(f"{label}@{alpha}", key, metrics)
    return metrics


def _wise_point(scoring: Scoring, label: str, checkpoint: str, alpha: float, weights: dict) -> dict:
    return score(scoring, label, checkpoint, alpha, weights, WISE_ROLES)


def logged_validation(run_dir: str) -> dict:
    """The validation metrics a ``--choose-epoch`` run logged (``--starft-val``) at its best epoch
    (``best.json``): ``val_avg``, ``val_worst_group``, ``val_groups``, ``val_in_dist`` and ``epoch``."""
    folder = os.path.join(run_dir, "checkpoints")
    best = read_json(os.path.join(folder, "best.json"))
    if best is None:
        raise DataError(f"run {run_dir} has no checkpoints/best.json: it was not trained with --starft-val "
                        "(rerun the sweep with --on-mismatch rerun)")
    with open(os.path.join(folder, "results.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    at = {r["set"]: r for r in lines if r["epoch"] == best["epoch"] and r["step"] == best["step"]}
    return {"val_avg": at["val"]["top1"], "val_worst_group": at["val"]["worst_group"], "val_groups": at["val"]["groups"],
            "val_in_dist": at["val_in_dist"]["top1"] if "val_in_dist" in at else None, "epoch": best["epoch"]}


def setting_metrics(scoring: Scoring, setting: Setting, checkpoint: str) -> dict:
    """A setting's metrics: evaluated on every set, or with ``--choose-epoch`` the validation numbers its run
    logged at the epoch it kept and the test sets evaluated on that epoch's weights."""
    if not scoring.ctx.validation:
        return score(scoring, setting.name, checkpoint)
    return {**score(scoring, setting.name, checkpoint, roles=WISE_ROLES),
            **logged_validation(scoring.ctx.run_dir(setting))}


def grid_rows(scoring: Scoring, grid: list[Setting], checkpoints: dict[str, str]) -> list[dict]:
    """The zero-shot row, then one row per setting: its settings, checkpoint and metrics."""
    rows = [{"method": "zero-shot", "name": "zero-shot", "lam": None, "schedule": None, "descriptors": None,
             "checkpoint": None, **score(scoring, "zero-shot", None)}]
    for s in grid:
        rows.append({"method": s.method, "name": s.name, "lam": s.lam, "schedule": s.schedule, "descriptors": s.descriptors,
                     "checkpoint": checkpoints[s.name], **setting_metrics(scoring, s, checkpoints[s.name])})
    return rows


def wise_curves(scoring: Scoring, alphas: list[float], checkpoints: dict[str, str], chosen: str) -> dict[str, list[dict]]:
    """WiSE-FT zero-shot → FLYP and zero-shot → the chosen StarFT, on the test sets."""
    wise, evaluator = {}, scoring.evaluator
    for label, name in (("flyp", "flyp"), ("starft", chosen)):
        if name in checkpoints:
            point = functools.partial(_wise_point, scoring, name, checkpoints[name])
            wise[label] = wise_curve(evaluator.zero_shot, evaluator.state_dict(checkpoints[name]), alphas, point)
    return wise


def _frontier_point(x: str, row: dict) -> dict:
    return {"in_dist": row[x], "worst_group": row["worst_group"], "selected": row.get("selected")}


def write_frontier_plot(path: str, rows: list[dict], wise: dict, alphas: list[float], x: str) -> None:
    """``frontier.png``: the WiSE-FT curves, the grid, FLYP and the zero-shot model on the test sets."""
    point = functools.partial(_frontier_point, x)
    curves = {f"WiSE-FT(FLYP), α {alphas[0]:g}..{alphas[-1]:g}": [point(p) for p in wise["flyp"]]}
    if "starft" in wise:
        curves["WiSE-FT(selected StarFT)"] = [point(p) for p in wise["starft"]]
    points = {"StarFT grid": [point(r) for r in rows if r["method"] == "starft"],
              "FLYP": [point(r) for r in rows if r["method"] == "flyp"],
              "zero-shot": [point(r) for r in rows if r["method"] == "zero-shot"]}
    plot_frontiers({"test": {"curves": curves, "points": points}}, path,  # written whole (eval.report.save_png)
                   x_label=f"test {'in-distribution' if x == 'in_dist' else ''} accuracy (%)")


def add_wise(result: dict, scoring: Scoring, alphas: list[float], checkpoints: dict[str, str]) -> None:
    """``result``'s WiSE-FT curves and, with a test set, the frontier comparison and its plot."""
    rows = result["grid"]
    result["wise"] = wise = wise_curves(scoring, alphas, checkpoints, result["selected"])
    if "flyp" in wise and "test" in result["sets"]:
        result["frontier"] = frontier(rows, wise, "in_dist" if "test_in_dist" in result["sets"] else "avg")
        write_frontier_plot(os.path.join(scoring.ctx.out, "frontier.png"), rows, wise, alphas, result["frontier"]["x"])


def prepare_sets(sets: dict[str, str], classnames: str) -> dict:
    """Every named set checked and listed before anything is trained (one line naming the flag and
    the path that is missing or unreadable)."""
    prepared = {}
    for role, root in sets.items():
        try:
            prepared[role] = prepare_set(EvalSetSpec(name=role, root=root, classnames=classnames))
        except StarftError as e:
            raise with_flag(e, f"--{role.replace('_', '-')} {root}") from None
    return prepared


def first_shards(train_args: list[str]) -> list[str]:
    """The first file of each source of the runs' ``--train-data`` (``A::B``, brace patterns); URLs and
    ``pipe:`` sources are not checked."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--train-data")
    known, _ = parser.parse_known_args(train_args)
    if not known.train_data:
        raise ConfigError("the training flags after '--' give no --train-data: name the fine-tuning set")
    sources = [s for s in known.train_data.split("::") if s and is_local_url(s)]
    return [next(iter(braceexpand(s))) for s in sources]


def check_inputs(args, train_args: list[str]) -> None:
    """Every input file the sweep names exists, before anything is trained: the class names, descriptor
    files, the model folder or weights file, and the first shard of the training data."""
    if args.classnames != "imagenet" and not os.path.isfile(args.classnames):
        raise ConfigError(f"--classnames {args.classnames}: no such file: give the class names file (one name per line)")
    for spec in args.concepts or []:
        try:
            load_descriptors(spec)
        except StarftError as e:
            raise with_flag(e, f"--concepts {spec}") from None
    if args.model.startswith("local-dir:") and not os.path.isdir(args.model[len("local-dir:"):]):
        raise ConfigError(f"--model {args.model}: no such folder: give an exported model folder (local-dir:DIR)")
    if args.pretrained and args.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) \
            and not os.path.isfile(args.pretrained):
        raise ConfigError(f"--pretrained {args.pretrained}: no such file")
    for shard in first_shards(train_args):
        if not os.path.exists(shard):
            raise ConfigError(f"--train-data after '--': {shard} does not exist (the first file of the pattern)")


def context_of(args, log: Callable[[str], None] | None) -> SweepContext:
    """The sweep's context from its parsed flags, with the paths it passes on made absolute."""
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    train_epochs(train_args)  # refuses flags the sweep sets, before anything runs
    if args.on_mismatch not in MISMATCH:
        raise ConfigError(f"--on-mismatch {args.on_mismatch!r}: use one of {', '.join(MISMATCH)}")
    check_inputs(args, train_args)
    pretrained = absolute_files(args.pretrained) if args.pretrained else None
    return SweepContext(out=os.path.abspath(args.out), model=absolute_files(args.model) if args.model.startswith(
        "local-dir:") else args.model, pretrained=pretrained, classnames=absolute_files(args.classnames),
        train_args=train_args, threads=args.threads, on_mismatch=args.on_mismatch, report=log or logger.info,
        validation=validation_flags(args) if args.choose_epoch else [])


def validation_flags(args) -> list[str]:
    """``--choose-epoch``: every run scores the validation sets after each epoch and keeps its best epoch
    by validation worst group (``--starft-val``, ``--starft-select``); a choice on validation only."""
    flags = ["--starft-val", f"val={absolute_files(args.val)}"]
    if args.val_in_dist:
        flags += ["--starft-val", f"val_in_dist={absolute_files(args.val_in_dist)}"]
    return [*flags, "--starft-select", "val:worst_group"]


def only_run(ctx: SweepContext, grid: list[Setting], index: int) -> dict:
    """One task of a job array: train grid setting ``index`` and evaluate nothing."""
    if not 0 <= index < len(grid):
        raise ConfigError(f"--only-run {index}: the grid has settings 0..{len(grid) - 1} "
                          f"(submit the array as --array=0-{len(grid) - 1})")
    return {"trained": run_setting(grid[index], ctx)}


def run(args, log: Callable[[str], None] | None = None) -> dict:
    """The sweep of parsed ``args`` (``build_parser``): train the grid (reusing only runs trained with
    the same settings), evaluate, choose on validation, add the WiSE-FT curves; writes and returns
    ``sweep.json``'s content. Progress goes to ``log`` (default: this module's logger)."""
    ctx = context_of(args, log)
    grid = make_grid(parse_floats(args.lambdas, "--lambdas"), [s for s in args.schedules.split(",") if s],
                     args.concepts or ["background"], flyp=not args.no_flyp)
    roots = {role: getattr(args, role) for role in ROLES if getattr(args, role)}
    prepared = prepare_sets(roots, ctx.classnames)
    if args.only_run is not None:
        return only_run(ctx, grid, args.only_run)
    start, alphas = time.time(), parse_alphas(args.wise_alphas) if args.wise_alphas else []
    plans = plan_runs(ctx, grid)
    cache = ScoreCache(os.path.join(ctx.out, "evals.json"))
    set_keys = {role: {"root": p.root, "format": p.format} for role, p in prepared.items()}
    reused = {"zero-shot": None, **{s.name: ctx.final_checkpoint(s) for s in grid if plans[s.name] == "reuse"}}
    check_cached_scores(ctx, cache, set_keys, reused, alphas)
    ctx.report(f"sweep: {len(grid)} fine-tune(s) into {ctx.logs}; choice on {roots['val']}")
    checkpoints = {s.name: train_run(ctx, s, plans[s.name]) for s in grid}
    from open_clip_starft.eval.models import default_device
    device = args.device or default_device()
    scoring = Scoring(ctx, WeightsScorer(ctx.model, ctx.pretrained, roots, ctx.classnames, device,
                                     cache_images=args.cache_images, prepared=prepared), cache, set_keys)
    rows = grid_rows(scoring, grid, checkpoints)
    chosen = select(rows)
    for r in rows:
        r["selected"] = r is chosen
    result = {"criterion": CRITERION, "model": args.model, "pretrained": args.pretrained, "sets": roots,
              "train_args": ctx.train_args, "grid": rows, "selected": chosen["name"]}
    ctx.report(f"  selected on validation: {chosen['name']} (val worst group {chosen['val_worst_group']:.3f})")
    if alphas:
        add_wise(result, scoring, alphas, checkpoints)
    write_json(os.path.join(ctx.out, "sweep.json"), result)
    ctx.report(f"  sweep.json: {os.path.join(ctx.out, 'sweep.json')} ({time.time() - start:.0f} s)")
    return result


def results_table(result: dict) -> str:
    """The grid's metrics as a text table (the command's output; ``*`` marks the choice)."""
    columns = (("val acc", "val_avg"), ("val WG", "val_worst_group"), ("val ID", "val_in_dist"),
               ("test acc", "avg"), ("test WG", "worst_group"), ("test ID", "in_dist"))
    width = max(len(r["name"]) for r in result["grid"]) + 2
    lines = [f"{'run':<{width}}" + "".join(f"{title:>9}" for title, _ in columns)]
    for r in result["grid"]:
        cells = "".join(f"{'-' if r[key] is None else format(r[key], '.3f'):>9}" for _, key in columns)
        lines.append(f"{r['name'] + (' *' if r.get('selected') else ''):<{width}}{cells}")
    return "\n".join(lines)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft sweep", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--out", required=True, metavar="DIR", help="runs, evaluations, sweep.json and frontier.png")
    parser.add_argument("--model", required=True, metavar="NAME|local-dir:DIR", help="the zero-shot model fine-tuned by every run")
    parser.add_argument("--pretrained", metavar="FILE|TAG", help="its weights, for an OpenCLIP model name (not with local-dir:)")
    parser.add_argument("--classnames", required=True, metavar="FILE",
                        help="class names by class id (--starft-classnames of the runs; the eval heads)")
    parser.add_argument("--val", required=True, metavar="ROOT", help="validation set with groups: the choice is made here")
    parser.add_argument("--val-in-dist", metavar="ROOT", help="validation in-distribution set: its accuracy breaks ties")
    parser.add_argument("--test", metavar="ROOT", help="test set with groups: recorded, never used for the choice")
    parser.add_argument("--test-in-dist", metavar="ROOT", help="test in-distribution set: the frontier's x axis")
    parser.add_argument("--lambdas", default="0.5,1,2,4,8", help="λ values > 0 (default 0.5,1,2,4,8)")
    parser.add_argument("--schedules", default="linear,staircase,constant", help="λ schedules (default all three)")
    parser.add_argument("--concepts", action="append", metavar="SET|FILE",
                        help="a descriptor set (--starft-concepts value); repeat for several (default background)")
    parser.add_argument("--no-flyp", action="store_true", help="leave out the FLYP run (λ = 0)")
    parser.add_argument("--choose-epoch", action="store_true",
                        help="choose the epoch as well as the setting, on validation: every run scores --val (and "
                             "--val-in-dist) after each epoch (--starft-val) and keeps its best validation-worst-group "
                             "epoch (best.pt); the sweep reads those logged validation numbers instead of evaluating "
                             "each run again, and scores the test sets on the kept epoch")
    parser.add_argument("--wise-alphas", metavar="A,B|START:STOP:STEP",
                        help="also WiSE-FT curves zero-shot→FLYP and →selected StarFT, e.g. 0:1:0.1")
    parser.add_argument("--only-run", type=int, metavar="I",
                        help="train only grid setting I (0 = FLYP unless --no-flyp) and stop: one task of a SLURM "
                             "job array; a later sweep without it reads the finished runs and chooses")
    parser.add_argument("--on-mismatch", choices=MISMATCH, default="refuse",
                        help="a run in --out trained with other settings (or a cached score computed otherwise): "
                             "refuse in one line naming the difference (default), or rerun (the old run is moved to "
                             "OUT/stale/NAME.N and trained again; the score evaluated again)")
    parser.add_argument("--cache-images", action="store_true",
                        help="keep the sets' preprocessed images in memory across models (small sets: faster)")
    parser.add_argument("--threads", type=int, default=1, help="compute threads per training run (default 1)")
    parser.add_argument("--device",
                        help="device of the evaluations (default cuda when available)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the training flags of every run")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.pretrained and args.model.startswith("local-dir:"):
        raise ConfigError("--pretrained with a local-dir: model is ignored by OpenCLIP: export the weights as a local-dir "
                          "model and pass only --model local-dir:DIR")
    progress = logging.StreamHandler(sys.stderr)  # progress on stderr (this module's only); the table on stdout
    progress.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # libraries' logging.info() may give the root logger a handler mid-run
    try:
        result = run(args)
    finally:
        logger.removeHandler(progress)
        logger.propagate = True
    if "grid" in result:
        print(results_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
