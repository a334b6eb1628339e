"""``open-clip-starft demo``: the paper's protocol in miniature, on built-in data, no downloads.

The paper fine-tunes CLIP on ImageNet and scores Waterbirds zero-shot: the fine-tune never sees the
target's images or classes, and what breaks is the transfer of a concept through features (backgrounds)
the fine-tune learned as shortcuts for *other* classes. The demo does the same with ``demo.data``'s
transfer design (shapes with a colour, a fill pattern and a background):

1. Writes the parts as webdataset shards: pre-training (every colour, shape, pattern and background;
   captions name the shape, often the colour, sometimes the background, never the pattern); the SOURCE
   task (``SOURCE_CLASSNAMES``: "striped circle", ... in the source colours, each shape on its own
   background ``DESIGN['p_spurious']`` of the time) as fine-tuning set, source validation and source test;
   the TARGET task (the shape of plain objects in the held-out colours, every background equally likely,
   group = shape × background) as target validation and target test. No target image and no held-out
   colour is in the fine-tune.
2. Pre-trains a tiny CLIP contrastively (``open_clip_train.main``). If its zero-shot target validation
   accuracy or worst group falls below ``COMPETENT``, the demo says so in one line and stops (exit 1).
3. Fine-tunes it on the source task through ``open_clip_starft.main`` (``tools.sweep``'s runs): FLYP
   (λ = 0), StarFT at the paper's default (λ 0.5, linear decay, not tuned) and StarFT at ``DEFAULT`` (the
   study's validation choice), with the demo's own background descriptors.
4. Scores every model zero-shot (target through the target's class names, source through the source's)
   and WiSE-FT(FLYP) at each StarFT's source accuracy, and prints the table and one sentence.

``python -m studies.demo_study`` (a checkout's ``studies/demo_study.py``) is the evidence over independent
units (``docs/demo.md``) and the record of how the design's free parameters were chosen on validation
(``docs/demo-design.json``).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time

from open_clip_starft.data.files import write_text
from open_clip_starft.demo import data as demo_data
from open_clip_starft.errors import ConfigError, DataError, one_line_errors
from open_clip_starft.eval.frontier import matched_worst_group
from open_clip_starft.eval.sets import EvalSetSpec, prepare_set
from open_clip_starft.tools import stages, sweep

# The transfer design's free parameters, chosen on validation by ``python -m studies.demo_study --design``
# (docs/demo-design.json records every candidate and the rule). Colours: 3 source, 2 held out for the target.
DESIGN = dict(source_colours=["red", "pink", "black"], target_colours=["orange", "purple"], p_spurious=0.95,
              p_plain=0.7, p_colour=0.5, p_background=0.2, image_size=32)
PRETRAIN_SAMPLES = 8192
PRETRAIN = dict(epochs=40, lr=2e-3, batch_size=128, warmup=256)  # 2560 steps; lr 3e-3 after 20 warm-up steps stalled some seeds
FINETUNE_SAMPLES = 1024
FINETUNE = dict(epochs=16, lr=2e-3, batch_size=64, warmup=10)  # 256 steps; 128 steps learned 7 points of source
EVAL_SAMPLES = 2048  # each of target validation / test and source validation / test
# A zero-shot model worth preserving: target validation accuracy and worst group at least these.
COMPETENT = dict(val_avg=0.80, val_worst_group=0.50)
PAPER = dict(lam=0.5, schedule="linear")  # the paper's setting (λ 0.5, linearly decayed), never tuned here
# StarFT at the study's validation choice: the best mean target-validation worst group over the study's units
# (tests/test_demo_run.py checks it against docs/demo.json): λ 32 constant, the grid's largest λ; update it as
# units land.
DEFAULT = dict(lam=32.0, schedule="constant")
WISE_ALPHAS = "0:1:0.05"
# Each data part's id in its seed (never reuse one): a part's seed comes from (unit seed, part id) through
# numpy's SeedSequence, so no two units or parts share a sample's draws. Roles as tools.sweep names them:
# val / test are the TARGET task (with groups), val_in_dist / test_in_dist the SOURCE task.
PART_IDS = dict(pretrain=1, finetune=2, test=3, val=4, test_in_dist=5, val_in_dist=6)
PART_KIND = dict(pretrain="pretrain", finetune="source", val_in_dist="source", test_in_dist="source",
                 val="target", test="target")


def part_seed(unit_seed: int, part: str) -> int:
    """The data seed of part ``part`` (a ``PART_IDS`` name) of unit ``unit_seed`` (≥ 0): a 32-bit word of
    ``numpy.random.SeedSequence([unit_seed, PART_IDS[part]])``, distinct for distinct (unit, part) pairs but
    for a 2**-32 chance (``tests/test_demo_data.py`` checks the parts' images of several units)."""
    import numpy as np
    if unit_seed < 0:
        raise ConfigError(f"the demo's seed {unit_seed} is negative: give a seed of 0 or more")
    return int(np.random.SeedSequence([unit_seed, PART_IDS[part]]).generate_state(1)[0])


def run_stage(title: str, module: str, args: list[str], console: str) -> None:
    """Run ``python -m module args`` (one compute thread), printing the title and the seconds it took."""
    print(f"  {title} ...", end="", flush=True)
    print(f" {stages.run_stage(module, args, console, what=title, threads=1):.0f} s")


def common_args(data: str, logs: str, name: str | None, seed: int, epochs: int, lr: float, batch_size: int,
                warmup: int, save_every_epoch: bool = False) -> list[str]:
    """The training flags shared by pre-training and fine-tuning (no ``--name`` when None)."""
    return ["--train-data", data, "--dataset-type", "webdataset", "--device", "cpu", "--workers", "1",
            "--precision", "fp32",  # upstream's default "amp" is float16 autocast: several times slower on a CPU
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr), "--wd", "0.1",
            "--warmup", str(warmup), "--seed", str(seed), "--log-every-n-steps", "4",
            "--save-frequency", "1" if save_every_epoch else str(epochs),  # each checkpoint is ~40 MB
            *(["--logs", logs, "--name", name] if name else [])]


def write_data(root: str, seed: int, design: dict = DESIGN, sizes: dict | None = None) -> dict:
    """Every part of the design under ``root`` (brace patterns by ``PART_IDS`` name), the source and target
    class-name files and the demo's descriptor file (its four background phrases). ``sizes`` overrides the
    sample counts by part (default: ``PRETRAIN_SAMPLES``, ``FINETUNE_SAMPLES``, ``EVAL_SAMPLES``); a part
    given 0 samples is not written."""
    counts = {"pretrain": PRETRAIN_SAMPLES, "finetune": FINETUNE_SAMPLES,
              **{p: EVAL_SAMPLES for p in ("val", "test", "val_in_dist", "test_in_dist")}, **(sizes or {})}
    paths = {}
    for part in PART_IDS:
        if not counts[part]:  # a part left out (the design trials write no test set)
            continue
        paths[part] = demo_data.brace_pattern(demo_data.write_transfer_shards(
            os.path.join(root, part), counts[part], seed=part_seed(seed, part), part=PART_KIND[part], design=design,
            samples_per_shard=1024, prefix=part))
    paths["source_classnames"] = os.path.join(root, "source_classnames.txt")
    write_text(paths["source_classnames"], "\n".join(demo_data.SOURCE_CLASSNAMES) + "\n")
    paths["target_classnames"] = os.path.join(root, "target_classnames.txt")
    write_text(paths["target_classnames"], "\n".join(demo_data.SHAPES) + "\n")
    paths["descriptors"] = os.path.join(root, "backgrounds.txt")
    write_text(paths["descriptors"], "# spurious descriptors for the demo: its backgrounds\n"
               + "".join(f"{{}} {phrase}.\n" for phrase in demo_data.BACKGROUND_PHRASES.values()))
    return paths


def pretrain(out: str, seed: int, data: dict, settings: dict | None = None) -> str:
    """The zero-shot model of ``seed`` as a ``local-dir:`` model (reused when already exported); ``settings``:
    the pre-training's epochs, lr, batch size and warm-up (default ``PRETRAIN``, read at call time)."""
    settings = PRETRAIN if settings is None else settings
    init_dir, target = os.path.join(out, "models", "init"), os.path.join(out, "models", "zero-shot")
    if any(os.path.isfile(os.path.join(target, f)) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        print("  pre-trained zero-shot model found, not retrained")
        return f"local-dir:{target}"
    from open_clip_starft.tools.tiny_model import write_tiny_model  # torch: not on the --help path
    logs = os.path.join(out, "logs")
    shutil.rmtree(os.path.join(logs, "zero-shot-pretrain"), ignore_errors=True)
    init = write_tiny_model(init_dir, seed=seed, image_size=DESIGN["image_size"])
    run_stage("pre-training the zero-shot model (open_clip_train.main on captions that never name the pattern)",
              "open_clip_train.main", ["--model", init, *common_args(data["pretrain"], logs, "zero-shot-pretrain", seed,
                                                                    **settings)],
              os.path.join(logs, "zero-shot-pretrain.console.txt"))
    checkpoint = os.path.join(logs, "zero-shot-pretrain", "checkpoints", f"epoch_{settings['epochs']}.pt")
    exported = stages.export_checkpoint(checkpoint, f"local-dir:{init_dir}", target)
    shutil.rmtree(os.path.join(logs, "zero-shot-pretrain", "checkpoints"), ignore_errors=True)  # exported: 40 MB less
    return exported


def scorer(data: dict, model: str, roles=sweep.ROLES) -> sweep.WeightsScorer:
    """Zero-shot scores of weights on the demo's sets: the target's (val, test) through the target's class
    names, the source's (val_in_dist, test_in_dist) through the source's."""
    names = {role: data["target_classnames" if role in ("val", "test") else "source_classnames"] for role in roles}
    prepared = {role: prepare_set(EvalSetSpec(name=role, root=data[role], classnames=names[role])) for role in roles}
    return sweep.WeightsScorer(model, None, {r: data[r] for r in roles}, data["source_classnames"], "cpu",
                               cache_images=True, prepared=prepared)


def competence(zero_shot_row: dict, seed: int) -> str | None:
    """None when the zero-shot model meets ``COMPETENT`` on target validation, else the one-line reason."""
    low = [f"{k.replace('val_', 'target validation ').replace('_', '-')} {zero_shot_row[k]:.3f} < {v:.2f}"
           for k, v in COMPETENT.items() if zero_shot_row[k] < v]
    if not low:
        return None
    return (f"pre-training failed for --seed {seed}: the zero-shot model's {', '.join(low)}, so it has nothing for "
            "StarFT to preserve; the results would mean nothing. Try another --seed.")


def context(out: str, seed: int, data: dict, model: str, save_every_epoch: bool = False,
            finetune: dict | None = None) -> sweep.SweepContext:
    """The fine-tunes' context (``tools.sweep``): runs under ``out/runs/NAME``, the source class names, the
    demo's fine-tuning flags (``finetune``, default ``FINETUNE`` read at call time); ``save_every_epoch`` keeps every
    epoch's checkpoint (an epoch choice)."""
    finetune = FINETUNE if finetune is None else finetune
    return sweep.SweepContext(out=out, model=model, pretrained=None, classnames=data["source_classnames"],
                              train_args=common_args(data["finetune"], "", None, seed, **finetune,
                                                     save_every_epoch=save_every_epoch), report=lambda *_: None)


_LOG_SCALE = re.compile(r"Logit Scale: ([0-9.eE+-]+)")
_LOG_STAR = re.compile(r"Star term: ([0-9.eE+-]+)")


def training_log_terms(run_dir: str) -> dict:
    """From a fine-tune's ``out.log`` (every logged step's line): ``teacher_logit_scale``, the logit scale at the
    first step (taken before any update, so the zero-shot model's, which the teacher keeps), and
    ``star_term_first`` / ``star_term_last``, the unweighted Star term (batch-mean KL) at the first and the last
    logged step (None for FLYP, which logs none)."""
    path = os.path.join(run_dir, "out.log")
    try:
        with open(path, errors="replace") as f:
            lines = [line for line in f if "Train Epoch:" in line]
    except OSError:
        raise DataError(f"{path}: no training log: the run did not log its steps") from None
    if not lines:
        raise DataError(f"{path}: no 'Train Epoch:' line: the run logged no step")
    scale = _LOG_SCALE.search(lines[0])
    stars = [float(m.group(1)) for m in map(_LOG_STAR.search, lines) if m]
    return {"teacher_logit_scale": float(scale.group(1)) if scale else None,
            "star_term_first": stars[0] if stars else None, "star_term_last": stars[-1] if stars else None}


def settings(descriptors: str, choice: dict = DEFAULT) -> list[sweep.Setting]:
    """The demo's fine-tunes: FLYP, StarFT at the paper's default and at ``choice`` (once if they coincide)."""
    grid = [sweep.Setting(0.0), sweep.Setting(PAPER["lam"], PAPER["schedule"], descriptors)]
    if (choice["lam"], choice["schedule"]) != (PAPER["lam"], PAPER["schedule"]):
        grid.append(sweep.Setting(choice["lam"], choice["schedule"], descriptors))
    return grid


def describe(rows: dict[str, dict], wise: dict[str, float]) -> str:
    """One sentence on the demo's table: the damage FLYP does, what each StarFT keeps, and whether it beats
    WiSE-FT(FLYP) at its own source accuracy (one run: no interval)."""
    zs, flyp = rows["zero-shot"], rows["FLYP"]
    parts = [f"fine-tuning on the source task moved target worst group from {100 * zs['worst_group']:.1f} to "
             f"{100 * flyp['worst_group']:.1f} % (FLYP) while source accuracy rose from {100 * zs['in_dist']:.1f} to "
             f"{100 * flyp['in_dist']:.1f} %"]
    for name, r in rows.items():
        if name.startswith("StarFT"):
            diff = r["worst_group"] - wise[name]
            parts.append(f"{name} reached {100 * r['worst_group']:.1f} % at {100 * r['in_dist']:.1f} % source accuracy, "
                         f"{100 * abs(diff):.1f} points {'above' if diff >= 0 else 'below'} WiSE-FT(FLYP) there")
    return "In this one run, " + "; ".join(parts) + " (one unit: docs/demo.md has the intervals over units)."


def demo(out: str, seed: int) -> int:
    """The demo: data, zero-shot model, competence check, FLYP and the two StarFT runs, WiSE-FT, table."""
    start = time.time()
    print(f"StarFT demo in {out}")
    shutil.rmtree(os.path.join(out, "runs"), ignore_errors=True)  # the demo's own runs: start them afresh
    shutil.rmtree(os.path.join(out, "models", "zero-shot"), ignore_errors=True)
    print("  writing the built-in transfer data (pre-training, source task, target task) as webdataset shards ...",
          end="", flush=True)
    stage = time.time()
    data = write_data(os.path.join(out, "data"), seed)
    print(f" {time.time() - stage:.0f} s")
    model = pretrain(out, seed, data)
    score = scorer(data, model)
    zero_shot = score(score.zero_shot)
    failed = competence(zero_shot, seed)
    if failed:
        print(f"open-clip-starft demo: {failed}", file=sys.stderr)
        return 1
    print(f"  zero-shot model competent on the target: validation accuracy {zero_shot['val_avg']:.3f}, worst group "
          f"{zero_shot['val_worst_group']:.3f} (the demo needs {COMPETENT['val_avg']:.2f} / {COMPETENT['val_worst_group']:.2f})")
    ctx = context(out, seed, data, model)
    grid = settings(data["descriptors"])
    rows = {"zero-shot": zero_shot}
    labels = {"flyp": "FLYP"}
    labels[grid[1].name] = f"StarFT λ {PAPER['lam']:g} {PAPER['schedule']} (paper)"
    if len(grid) > 2:
        labels[grid[2].name] = f"StarFT λ {DEFAULT['lam']:g} {DEFAULT['schedule']} (study)"
    checkpoints = {}
    for s in grid:
        print(f"  fine-tuning {labels[s.name]} on the source task ...", end="", flush=True)
        stage = time.time()
        checkpoints[s.name] = sweep.run_setting(s, ctx)
        rows[labels[s.name]] = score(score.state_dict(checkpoints[s.name]))
        print(f" {time.time() - stage:.0f} s")
    print("  WiSE-FT(FLYP) curve (α every 0.05) ...", end="", flush=True)
    stage = time.time()
    from open_clip_starft.eval.frontier import wise_curve
    from open_clip_starft.eval.wise import parse_alphas
    curve = wise_curve(score.zero_shot, score.state_dict(checkpoints["flyp"]), parse_alphas(WISE_ALPHAS),
                       lambda a, sd: score(sd, ("test", "test_in_dist")))
    print(f" {time.time() - stage:.0f} s")
    wise = {name: matched_worst_group(curve, r["in_dist"])[0] for name, r in rows.items() if name.startswith("StarFT")}
    print(f"\n  {'model':<32} {'target WG':>10} {'target acc':>11} {'source acc':>11}")
    for name, r in rows.items():
        print(f"  {name:<32} {100 * r['worst_group']:>10.1f} {100 * r['avg']:>11.1f} {100 * r['in_dist']:>11.1f}")
        if name in wise:
            print(f"  {'  WiSE-FT(FLYP) at its source acc':<32} {100 * wise[name]:>10.1f} {'':>11} "
                  f"{100 * r['in_dist']:>11.1f}")
    print("  (target: zero-shot shape of plain objects in the held-out colours, every background equally likely; WG: "
          "its worst (shape, background) group; source: test accuracy on the fine-tuned task; WiSE-FT(FLYP): FLYP's "
          "weights mixed with the zero-shot model's, read at the StarFT row's source accuracy)")
    print("\n  " + describe(rows, wise))
    print(f"\n  checkpoints: {os.path.join(out, 'runs', '<run>', 'checkpoints')}")
    print(f"  logs:        {os.path.join(out, 'runs', '<run>', 'out.log')}")
    print(f"  done in {time.time() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="starft-demo", help="folder for data, models, logs and results (default ./starft-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the runs (default 0)")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    return demo(out, args.seed)
