"""``open-clip-starft demo``: a short, real StarFT run on a built-in dataset, no downloads.

1. Writes the built-in shapes-on-backgrounds dataset (``demo.data``) as webdataset shards: a
   balanced, captioned pre-training set; a fine-tuning set where each shape sits on "its"
   background 95 % of the time (the spurious correlation); balanced validation and test sets
   (every background equally likely for every shape, each its own seed); and validation and test
   in-distribution sets (the fine-tuning set's 95 % correlation, drawn at 12 px and upsampled by
   the model's preprocessing, so that accuracy there has headroom and does not saturate).
2. Makes a small zero-shot model: a tiny CLIP pre-trained contrastively on the captioned set
   with OpenCLIP's own ``open_clip_train.main`` (most captions name the shape only, one in ten the
   background too). If its zero-shot validation accuracy or worst group falls below
   ``COMPETENT``, pre-training failed: the demo says so in one line and stops (exit 1), since a
   fine-tune of a model with nothing to preserve shows nothing.
3. Fine-tunes it on the biased set through ``open_clip_starft.main``: FLYP (λ = 0) and StarFT at
   ``DEFAULT`` (λ, schedule; the demo's own descriptors naming the backgrounds), same flags
   otherwise, as a one-setting ``open-clip-starft sweep``.
4. Evaluates each model zero-shot: accuracy and worst-group accuracy on validation and test,
   in-distribution accuracy on the in-distribution sets; prints where everything went.

``python -m studies.demo_study`` (a checkout's ``studies/demo_study.py``) runs the evidence behind ``DEFAULT`` (``docs/demo.json``, ``docs/demo.md``): for each
``--seeds`` pre-training seed, the sweep over ``--lambdas`` × ``--schedules`` chosen on
validation, WiSE-FT curves, and the frontier comparison over seeds (``eval.frontier``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from open_clip_starft.data.files import write_text
from open_clip_starft.tools import stages
from open_clip_starft.demo import data as demo_data
from open_clip_starft.errors import ConfigError, one_line_errors
from open_clip_starft.tools import sweep

IMAGE_SIZE = 32
P_SPURIOUS = 0.95  # fine-tuning and in-distribution sets: share of samples on their class's background
IN_DIST_IMAGE_SIZE = 12  # in-distribution sets: drawn at 12 px (upsampled to 32 by preprocessing)
# Pre-training: samples, share of captions that also name the background, and the run's settings
# (768 steps; a tiny random-init ViT needs a high lr and several hundred steps to tell the shapes apart).
PRETRAIN_SAMPLES, PRETRAIN_P_BACKGROUND = 8192, 0.1
PRETRAIN = dict(epochs=12, lr=3e-3, batch_size=128, warmup=20)
# Fine-tuning (FLYP and StarFT alike): 96 steps.
FINETUNE_SAMPLES = 1024
FINETUNE = dict(epochs=6, lr=1.5e-4, batch_size=64, warmup=10)
EVAL_SAMPLES = 2048  # each of validation, test and the two in-distribution sets
# A zero-shot model worth preserving: validation accuracy and worst-group accuracy at least these.
COMPETENT = dict(val_avg=0.80, val_worst_group=0.50)
# StarFT's setting in the demo: the study's choice on validation (docs/demo.md: the best mean validation worst
# group over the competent units of λ 0.5..128 × constant/staircase; tests/test_demo_run.py checks it against
# docs/demo.json). It is the grid's largest λ: averaged over units, validation worst group still rises towards the
# zero-shot model's as λ grows, while 3 of the 5 units' own choices are inside the grid.
DEFAULT = dict(lam=128.0, schedule="staircase")
WISE_ALPHAS = "0:1:0.1"  # the printed table's WiSE-FT(FLYP) curve, read at StarFT's in-distribution accuracy
# Each data part's id in its seed (never reuse one). A part's seed comes from (unit seed, part id) through
# numpy's SeedSequence, so no two units share a part's draws (unit seed + a fixed offset made unit 1's test
# set unit 0's validation set).
PART_IDS = dict(pretrain=1, finetune=2, test=3, val=4, test_in_dist=5, val_in_dist=6)


def part_seed(unit_seed: int, part: str) -> int:
    """The data seed of part ``part`` (a ``PART_IDS`` name) of unit ``unit_seed`` (≥ 0): a 32-bit word of
    ``numpy.random.SeedSequence([unit_seed, PART_IDS[part]])``, distinct for distinct (unit, part) pairs but
    for a 2**-32 chance (``tests/test_demo_run.py`` checks the parts' images of several units)."""
    import numpy as np
    if unit_seed < 0:
        raise ConfigError(f"the demo's seed {unit_seed} is negative: give a seed of 0 or more")
    return int(np.random.SeedSequence([unit_seed, PART_IDS[part]]).generate_state(1)[0])


def run_stage(title: str, module: str, args: list[str], console: str) -> None:
    """Run ``python -m module args`` (one compute thread; the data-loader worker gets the other
    core), printing the title and the seconds it took."""
    print(f"  {title} ...", end="", flush=True)
    print(f" {stages.run_stage(module, args, console, what=title, threads=1):.0f} s")


def common_args(data: str, logs: str, name: str | None, seed: int, epochs: int, lr: float, batch_size: int,
                warmup: int) -> list[str]:
    """The training flags shared by pre-training and fine-tuning (no ``--name`` when None)."""
    return ["--train-data", data, "--dataset-type", "webdataset", "--device", "cpu", "--workers", "1",
            "--precision", "fp32",  # upstream's default "amp" is float16 autocast: several times slower on a CPU
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr), "--wd", "0.1",
            "--warmup", str(warmup), "--seed", str(seed), "--log-every-n-steps", "4",
            "--save-frequency", str(epochs),  # only the last epoch's checkpoint (each one is ~40 MB)
            *(["--logs", logs, "--name", name] if name else [])]


def write_data(root: str, seed: int) -> dict:
    """Every split of the demo under ``root`` (brace patterns by split name), the class-names
    file and the demo's descriptor file (its four background phrases)."""
    def write(split, n, biased, image_size=IMAGE_SIZE, **kw):
        return demo_data.brace_pattern(demo_data.write_shards(
            os.path.join(root, split), n, seed=part_seed(seed, split), biased=biased, p_spurious=P_SPURIOUS,
            image_size=image_size, samples_per_shard=kw.pop("samples_per_shard", 128), prefix=split, **kw))
    paths = {
        "pretrain": write("pretrain", PRETRAIN_SAMPLES, False, samples_per_shard=1024,
                          caption_fn=demo_data.pretrain_caption(part_seed(seed, "pretrain"), PRETRAIN_P_BACKGROUND)),
        "finetune": write("finetune", FINETUNE_SAMPLES, True),
        "val": write("val", EVAL_SAMPLES, False), "test": write("test", EVAL_SAMPLES, False),
        "val_in_dist": write("val_in_dist", EVAL_SAMPLES, True, IN_DIST_IMAGE_SIZE),
        "test_in_dist": write("test_in_dist", EVAL_SAMPLES, True, IN_DIST_IMAGE_SIZE),
    }
    paths["classnames"] = os.path.join(root, "classnames.txt")
    write_text(paths["classnames"], "\n".join(demo_data.CLASSNAMES) + "\n")
    paths["descriptors"] = os.path.join(root, "backgrounds.txt")
    write_text(paths["descriptors"], "# spurious descriptors for the demo: its backgrounds\n"
               + "".join(f"{{}} {phrase}.\n" for phrase in demo_data.BACKGROUND_PHRASES.values()))
    return paths


def pretrain(out: str, seed: int, data: dict) -> str:
    """The zero-shot model of ``seed`` as a ``local-dir:`` model (reused when already exported)."""
    init_dir, target = os.path.join(out, "models", "init"), os.path.join(out, "models", "zero-shot")
    if any(os.path.isfile(os.path.join(target, f)) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        print("  pre-trained zero-shot model found, not retrained")
        return f"local-dir:{target}"
    logs = os.path.join(out, "logs")
    shutil.rmtree(os.path.join(logs, "zero-shot-pretrain"), ignore_errors=True)
    from open_clip_starft.tools.tiny_model import write_tiny_model  # torch: not on the --help path
    init = write_tiny_model(init_dir, seed=seed, image_size=IMAGE_SIZE)
    run_stage("pre-training the zero-shot model (open_clip_train.main, captions; 1 in 10 names the background)",
              "open_clip_train.main", ["--model", init, *common_args(data["pretrain"], logs, "zero-shot-pretrain", seed,
                                                                    **PRETRAIN)],
              os.path.join(logs, "zero-shot-pretrain.console.txt"))
    checkpoint = os.path.join(logs, "zero-shot-pretrain", "checkpoints", f"epoch_{PRETRAIN['epochs']}.pt")
    return stages.export_checkpoint(checkpoint, f"local-dir:{init_dir}", target)


def competence(zero_shot_row: dict, seed: int) -> str | None:
    """None when the zero-shot model meets ``COMPETENT`` on validation, else the one-line reason."""
    low = [f"{k.replace('val_', 'validation ').replace('_', '-')} {zero_shot_row[k]:.3f} < {v:.2f}"
           for k, v in COMPETENT.items() if zero_shot_row[k] < v]
    if not low:
        return None
    return (f"pre-training failed for --seed {seed}: the zero-shot model's {', '.join(low)}, so it has nothing for "
            "StarFT to preserve; the results would mean nothing. Try another --seed.")


def sweep_args(out: str, seed: int, data: dict, model: str, lambdas: str, schedules: str,
               wise_alphas: str | None) -> list[str]:
    """``open-clip-starft sweep`` arguments for the demo's splits and fine-tuning flags."""
    return ["--out", os.path.join(out, "sweep"), "--model", model, "--classnames", data["classnames"],
            "--val", data["val"], "--val-in-dist", data["val_in_dist"], "--test", data["test"],
            "--test-in-dist", data["test_in_dist"], "--lambdas", lambdas, "--schedules", schedules,
            "--concepts", data["descriptors"], "--device", "cpu", "--cache-images",
            *(["--wise-alphas", wise_alphas] if wise_alphas else []),
            "--", *common_args(data["finetune"], "", None, seed, **FINETUNE)]


def zero_shot_check(out: str, seed: int, data: dict, model: str) -> tuple[dict, str | None]:
    """The zero-shot model's validation metrics and the competence verdict (``competence``)."""
    evaluator = sweep.WeightsScorer(model, None, {"val": data["val"]}, data["classnames"], "cpu")
    row = evaluator(evaluator.zero_shot)
    return row, competence(row, seed)


def demo(out: str, seed: int) -> int:
    """The demo: data, zero-shot model, competence check, FLYP and StarFT at ``DEFAULT``, table."""
    start = time.time()
    print(f"StarFT demo in {out}")
    shutil.rmtree(os.path.join(out, "sweep"), ignore_errors=True)  # the demo's own runs: start them afresh
    shutil.rmtree(os.path.join(out, "models", "zero-shot"), ignore_errors=True)
    print("  writing the built-in dataset (shapes on water, grass, sand, snow) as webdataset shards ...", end="", flush=True)
    stage = time.time()
    data = write_data(os.path.join(out, "data"), seed)
    print(f" {time.time() - stage:.0f} s")
    model = pretrain(out, seed, data)
    row, failed = zero_shot_check(out, seed, data, model)
    if failed:
        print(f"open-clip-starft demo: {failed}", file=sys.stderr)
        return 1
    print(f"  zero-shot model competent: validation accuracy {row['val_avg']:.3f}, worst group "
          f"{row['val_worst_group']:.3f} (the demo needs {COMPETENT['val_avg']:.2f} / {COMPETENT['val_worst_group']:.2f})")
    print(f"  fine-tuning on the biased set (FLYP, λ = 0; StarFT, λ = {DEFAULT['lam']:g} {DEFAULT['schedule']}) "
          "and evaluating ...", end="", flush=True)
    stage = time.time()
    result = sweep.run(sweep.build_parser().parse_args(sweep_args(
        out, seed, data, model, f"{DEFAULT['lam']:g}", DEFAULT["schedule"], WISE_ALPHAS)), log=lambda *_: None)
    print(f" {time.time() - stage:.0f} s")
    print(f"\n  {'model':<34} {'val acc':>8} {'val WG':>7} {'test acc':>9} {'test WG':>8} {'in-dist':>8}")
    for r in result["grid"]:
        print(f"  {r['name']:<34} {r['val_avg']:>8.3f} {r['val_worst_group']:>7.3f} {r['avg']:>9.3f} "
              f"{r['worst_group']:>8.3f} {r['in_dist']:>8.3f}")
    f = result["frontier"]
    starft = next(r for r in result["grid"] if r.get("selected"))
    print(f"  {'WiSE-FT(FLYP) at StarFT in-dist':<34} {'':>8} {'':>7} {'':>9} {f['wise_matched_worst_group']:>8.3f} "
          f"{starft['in_dist']:>8.3f}")
    print(f"  (acc: balanced groups; WG: worst group; in-dist: test images drawn as the fine-tuning set, {P_SPURIOUS:.0%} "
          f"on the shape's own background, at {IN_DIST_IMAGE_SIZE} px; WiSE-FT(FLYP): FLYP's weights mixed with the "
          f"zero-shot model's, α {WISE_ALPHAS}, read at StarFT's test in-dist"
          + (", outside the curve's range: its nearest end" if f["clamped"] else "") + ")")
    print(f"\n  checkpoints: {os.path.join(out, 'sweep', 'runs', '<run>', 'checkpoints')}")
    print(f"  logs:        {os.path.join(out, 'sweep', 'runs', '<run>', 'out.log')}")
    print(f"  results:     {os.path.join(out, 'sweep', 'sweep.json')}")
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
