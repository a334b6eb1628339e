"""``open-clip-starft sweep``: StarFT over a grid of settings, chosen on a validation set you name.

    open-clip-starft sweep --out sweep/ --model local-dir:zs --classnames classes.txt \\
        --val val=/data/val/shard-{000000..000015}.tar --val-in-dist /data/val-id.tar \\
        --test /data/test.tar --test-in-dist /data/test-id.tar \\
        --lambdas 0.5,1,2,4,8 --schedules linear,staircase,constant --concepts background --concepts my.txt \\
        --wise-alphas 0:1:0.1 -- --train-data '/data/train-{0000..0099}.tar' --dataset-type webdataset \\
        --batch-size 64 --epochs 6 --lr 1e-5 --wd 0.1 --warmup 10

Runs ``open_clip_starft.main`` once per setting (λ × schedule × descriptor set, and FLYP, λ = 0)
with the training flags after ``--``, each as ``OUT/runs/NAME`` (a run whose last checkpoint exists
is read, not rerun; an unfinished one resumes from its latest checkpoint). Every run and the
zero-shot model are evaluated zero-shot (``eval``'s functions) on the validation set (accuracy and
worst-group accuracy), the optional validation in-distribution set, and the optional test sets.

The choice uses validation only: the StarFT setting with the best validation worst-group accuracy;
ties go to the higher validation in-distribution accuracy (else validation accuracy), then to the
earlier setting of the grid. Test numbers are recorded beside it and never read by the choice.
``--wise-alphas`` adds the WiSE-FT curves zero-shot→FLYP and zero-shot→selected StarFT (on the test
sets) and the frontier comparison (``eval.frontier``). Writes ``OUT/sweep.json`` (the whole grid, the choice and
the curves), ``OUT/evals.json`` (evaluations, reused when the sweep is rerun) and, with
``--wise-alphas``, ``OUT/frontier.png``. On a cluster, ``--only-run I`` trains setting I alone
(``scripts/slurm/sweep_select.sbatch`` submits the grid as a job array, then the choosing sweep).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from open_clip_starft.tools.stages import run_stage
from open_clip_starft.errors import StarftError, one_line_errors
from open_clip_starft.eval.frontier import matched_worst_group, plot_frontiers, wise_curve, write_json
from open_clip_starft.eval.metrics import HeadCache, classification_metrics, collect_logits
from open_clip_starft.eval.models import create_model, load_weights, run_checkpoints
from open_clip_starft.eval.sets import EvalSetSpec, batches, prepare_set
from open_clip_starft.eval.wise import parse_alphas

ROLES = ("val", "val_in_dist", "test", "test_in_dist")  # --val, --val-in-dist, --test, --test-in-dist
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
        raise StarftError(f"two grid settings share the run name {dup!r}: give descriptor files distinct names")
    return grid


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StarftError(f"{flag} {text!r}: write a comma list of numbers, e.g. 0.5,1,2,4,8") from None
    if not values or any(not (v >= 0 and v != float("inf")) for v in values):
        raise StarftError(f"{flag} {text!r}: every value must be finite and ≥ 0")
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
            raise StarftError(f"--{flag.replace('_', '-')} after '--': the sweep sets it (use its own --out, --model, "
                              "--pretrained, --classnames and grid flags)")
    return known.epochs


def run_setting(setting: Setting, *, logs: str, model: str, pretrained: str | None, classnames: str,
                train_args: list[str], threads: int = 1, log=print) -> str:
    """Train ``setting`` as ``logs/NAME`` unless its last checkpoint exists; returns that checkpoint."""
    epochs = train_epochs(train_args)
    final = os.path.join(logs, setting.name, "checkpoints", f"epoch_{epochs}.pt")
    if os.path.isfile(final):
        log(f"  {setting.name}: finished run found, not rerun")
        return final
    resume = ["--resume", "latest"] if os.path.isdir(os.path.join(logs, setting.name)) else []
    args = ["--model", model, *(["--pretrained", pretrained] if pretrained else []), "--starft-classnames", classnames,
            *setting.train_args(), *train_args, "--logs", logs, "--name", setting.name, *resume]
    seconds = run_stage("open_clip_starft.main", args, os.path.join(logs, f"{setting.name}.console.txt"),
                        what=f"sweep run {setting.name}", threads=threads)
    if not os.path.isfile(final):
        found = run_checkpoints(os.path.join(logs, setting.name), "last")
        raise StarftError(f"run {setting.name} ended without {final} (last: {found[-1]}): check --save-frequency")
    log(f"  {setting.name}: trained in {seconds:.0f} s")
    return final


class Evaluator:
    """Zero-shot metrics of weights on the named sets, by role: ``val_avg``, ``val_worst_group``,
    ``val_in_dist`` (top-1 of the validation in-distribution set), ``avg``, ``worst_group`` and
    ``in_dist`` (the test sets); a role without a set gives None. With ``cache_images`` the
    preprocessed images of every set are read once and kept in memory for every later model
    (sets × images × 3 × H × W floats: for small sets)."""

    def __init__(self, model: str, pretrained: str | None, sets: dict[str, str], classnames: str,
                 device: str = "cpu", batch_size: int = 256, cache_images: bool = False):
        self.model_name = model
        tag = pretrained if pretrained and not os.path.isfile(pretrained) else None
        self.model, self.preprocess, self.tokenizer = create_model(model, device, tag)
        if pretrained and not tag:
            load_weights(self.model, pretrained, model)
        self.zero_shot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.prepared = {role: prepare_set(EvalSetSpec(name=role, root=root, classnames=classnames))
                         for role, root in sets.items()}
        self.device, self.batch_size, self.cache_images = device, batch_size, cache_images
        self._images: dict[str, list] = {}

    def state_dict(self, checkpoint: str | None) -> dict:
        """The weights of a checkpoint file (None: the zero-shot model's)."""
        if checkpoint is None:
            return self.zero_shot
        load_weights(self.model, checkpoint, self.model_name)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _batches(self, prepared):
        if not self.cache_images:
            return batches(prepared, self.preprocess, self.batch_size)
        if prepared.name not in self._images:
            self._images[prepared.name] = list(batches(prepared, self.preprocess, self.batch_size))
        return self._images[prepared.name]

    def __call__(self, state_dict: dict, roles: tuple[str, ...] = ROLES) -> dict:
        """Metrics of ``state_dict`` on the sets of ``roles`` (the others give None)."""
        self.model.load_state_dict(state_dict)
        self.model.eval()
        sets = [p for role, p in self.prepared.items() if role in roles]
        heads = HeadCache(self.model, self.tokenizer, self.device)
        heads.prepare(sets)
        scale = float(self.model.logit_scale.detach().exp())
        by_role = {}
        for p in sets:
            logits, labels, groups, skipped = collect_logits(self.model, heads[p], self._batches(p), self.device,
                                                             class_map=p.class_map, logit_scale=scale)
            if skipped or not len(labels):
                raise StarftError(f"--{p.name.replace('_', '-')} {p.root}: {len(skipped)} unreadable image(s), e.g. "
                                  f"{skipped[0] if skipped else 'none readable'}: a sweep compares runs on whole sets only")
            by_role[p.name] = classification_metrics(logits, labels, groups)
        get = lambda role, key: by_role[role][key] if role in by_role else None  # noqa: E731
        return {"val_avg": get("val", "top1"), "val_worst_group": get("val", "worst_group"),
                "val_in_dist": get("val_in_dist", "top1"), "avg": get("test", "top1"),
                "worst_group": get("test", "worst_group"), "in_dist": get("test_in_dist", "top1"),
                "val_groups": get("val", "groups"), "groups": get("test", "groups")}


def select(rows: list[dict]) -> dict:
    """The validation choice among the StarFT rows (λ > 0), by ``CRITERION``; reads no test field."""
    starft = [r for r in rows if r["lam"]]
    if not starft:
        raise StarftError("no StarFT setting in the grid: give --lambdas with a value above 0")
    tie = lambda r: r["val_in_dist"] if r["val_in_dist"] is not None else r["val_avg"]  # noqa: E731
    return max(starft, key=lambda r: (r["val_worst_group"], tie(r)))  # max keeps the first of equals


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


def run(args, log=print) -> dict:
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "runs")
    grid = make_grid(parse_floats(args.lambdas, "--lambdas"), [s for s in args.schedules.split(",") if s],
                     args.concepts or ["background"], flyp=not args.no_flyp)
    sets = {role: getattr(args, role) for role in ROLES if getattr(args, role)}
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    train_epochs(train_args)  # refuses flags the sweep sets, before anything runs
    start = time.time()
    if args.only_run is not None:  # one task of a job array: train one setting, evaluate nothing
        if not 0 <= args.only_run < len(grid):
            raise StarftError(f"--only-run {args.only_run}: the grid has settings 0..{len(grid) - 1} "
                              f"(submit the array as --array=0-{len(grid) - 1})")
        s = grid[args.only_run]
        return {"trained": run_setting(s, logs=logs, model=args.model, pretrained=args.pretrained,
                                       classnames=args.classnames, train_args=train_args, threads=args.threads, log=log)}
    log(f"sweep: {len(grid)} fine-tune(s) into {logs}; choice on {sets['val']}")
    checkpoints = {s.name: run_setting(s, logs=logs, model=args.model, pretrained=args.pretrained,
                                       classnames=args.classnames, train_args=train_args, threads=args.threads, log=log)
                   for s in grid}
    evaluator = Evaluator(args.model, args.pretrained, sets, args.classnames, args.device,
                          cache_images=args.cache_images)
    cache_path = os.path.join(out, "evals.json")
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}

    def evaluate(label: str, checkpoint: str | None, alpha: float | None = None, base: dict | None = None,
                 roles: tuple[str, ...] = ROLES) -> dict:
        stamp = None if checkpoint is None else os.path.getmtime(checkpoint)
        key = f"{label}@{alpha}"
        hit = cache.get(key)
        if hit and hit["checkpoint"] == checkpoint and hit["mtime"] == stamp and hit["sets"] == sets:
            return hit["metrics"]
        sd = evaluator.state_dict(checkpoint) if base is None else base
        metrics = evaluator(sd, roles)
        cache[key] = {"checkpoint": checkpoint, "mtime": stamp, "sets": sets, "metrics": metrics}
        write_json(cache, cache_path)
        return metrics

    zero = {"method": "zero-shot", "name": "zero-shot", "lam": None, "schedule": None, "descriptors": None,
            "checkpoint": None, **evaluate("zero-shot", None)}
    rows = [zero]
    for s in grid:
        rows.append({"method": s.method, "name": s.name, "lam": s.lam, "schedule": s.schedule,
                     "descriptors": s.descriptors, "checkpoint": checkpoints[s.name],
                     **evaluate(s.name, checkpoints[s.name])})
    chosen = select(rows)
    for r in rows:
        r["selected"] = r is chosen
    result = {"criterion": CRITERION, "model": args.model, "pretrained": args.pretrained, "sets": sets,
              "train_args": train_args, "grid": rows, "selected": chosen["name"]}
    log(f"  selected on validation: {chosen['name']} (val worst group {chosen['val_worst_group']:.3f})")
    if args.wise_alphas:
        alphas = parse_alphas(args.wise_alphas)
        wise = {}
        for label, name in (("flyp", "flyp"), ("starft", chosen["name"])):
            if name in checkpoints:
                ckpt = checkpoints[name]
                wise[label] = wise_curve(evaluator.zero_shot, evaluator.state_dict(ckpt), alphas,
                                         lambda a, sd, name=name, ckpt=ckpt: evaluate(name, ckpt, a, base=sd, roles=("test", "test_in_dist")))
        result["wise"] = wise
        if "flyp" in wise and "test" in sets:
            result["frontier"] = frontier(rows, wise, "in_dist" if "test_in_dist" in sets else "avg")
            x = result["frontier"]["x"]
            to_point = lambda r: {"in_dist": r[x], "worst_group": r["worst_group"], "selected": r.get("selected")}  # noqa: E731
            plot_frontiers({"test": {
                "curves": {f"WiSE-FT(FLYP), α {alphas[0]:g}..{alphas[-1]:g}": [to_point(p) for p in wise["flyp"]],
                           **({"WiSE-FT(selected StarFT)": [to_point(p) for p in wise["starft"]]} if "starft" in wise else {})},
                "points": {"StarFT grid": [to_point(r) for r in rows if r["method"] == "starft"],
                           "FLYP": [to_point(r) for r in rows if r["method"] == "flyp"],
                           "zero-shot": [to_point(zero)]}}}, os.path.join(out, "frontier.png"),
                x_label=f"test {'in-distribution' if x == 'in_dist' else ''} accuracy (%)")
    write_json(result, os.path.join(out, "sweep.json"))
    log(f"  sweep.json: {os.path.join(out, 'sweep.json')} ({time.time() - start:.0f} s)")
    return result


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
    parser.add_argument("--wise-alphas", metavar="A,B|START:STOP:STEP",
                        help="also WiSE-FT curves zero-shot→FLYP and →selected StarFT, e.g. 0:1:0.1")
    parser.add_argument("--only-run", type=int, metavar="I",
                        help="train only grid setting I (0 = FLYP unless --no-flyp) and stop: one task of a SLURM "
                             "job array; a later sweep without it reads the finished runs and chooses")
    parser.add_argument("--cache-images", action="store_true",
                        help="keep the sets' preprocessed images in memory across models (small sets: faster)")
    parser.add_argument("--threads", type=int, default=1, help="compute threads per training run (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the evaluations (default cuda when available)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the training flags of every run")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.pretrained and args.model.startswith("local-dir:"):
        raise StarftError("--pretrained with a local-dir: model is ignored by OpenCLIP: export the weights as a local-dir "
                          "model and pass only --model local-dir:DIR")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
