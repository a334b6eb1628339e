"""``open-clip-starft demo``: a short, real StarFT run on a built-in dataset, no downloads.

1. Writes the built-in shapes-on-backgrounds dataset (``demo_data``) as webdataset shards: a
   balanced, captioned pre-training set; a fine-tuning set where each shape sits on "its"
   background most of the time (the spurious correlation); a balanced test set.
2. Makes a small zero-shot model: a tiny CLIP pre-trained contrastively on the captioned set
   with OpenCLIP's own ``open_clip_train.main``. Most pre-training captions name the shape only
   ("a photo of a circle."), one in ten names the background too ("a photo of a circle on the
   water."). Trained only on captions that name the background, a random-init tiny CLIP learns
   the backgrounds (a colour, easy) and hardly the shapes in a CPU-sized run.
3. Fine-tunes it on the biased set through ``open_clip_starft.main``: FLYP (λ = 0) and StarFT
   (λ = 0.5, descriptors naming the backgrounds), same flags otherwise.
4. Evaluates each model zero-shot on the balanced test set: its accuracy (every group alike),
   the worst-group accuracy, and the in-distribution accuracy, the group accuracies weighted by
   the fine-tuning set's group shares (Waterbirds' "average accuracy"); prints where the
   checkpoints, logs and ``results.json`` went.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

import open_clip
from open_clip.factory import load_state_dict

from open_clip_starft.demo import data as demo_data
from open_clip_starft.eval.models import save_openclip
from open_clip_starft.eval.metrics import evaluate_zero_shot
from open_clip_starft.demo.tiny_model import write_tiny_model

IMAGE_SIZE = 32
P_SPURIOUS = 0.95  # fine-tuning set: share of samples on their class's background
# Pre-training: samples, share of captions that also name the background, and the run's settings
# (768 steps; a tiny random-init ViT needs a high lr and several hundred steps to tell the shapes apart).
PRETRAIN_SAMPLES, PRETRAIN_P_BACKGROUND = 8192, 0.1
PRETRAIN = dict(epochs=12, lr=3e-3, batch_size=128, warmup=20)
# Fine-tuning (FLYP and StarFT alike): 96 steps.
FINETUNE_SAMPLES = 1024
FINETUNE = dict(epochs=6, lr=1.5e-4, batch_size=64, warmup=10)
TEST_SAMPLES = 2048  # 128 per group


def _run_stage(title: str, module: str, args: list[str], console: str) -> None:
    """Run ``python -m module args`` with its output in ``console``; a clear error if it fails."""
    start = time.time()
    print(f"  {title} ...", end="", flush=True)
    # One compute thread: the tiny model gains nothing from more, and the data-loader worker gets the other core.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    with open(console, "w") as out:
        status = subprocess.run([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env).returncode
    print(f" {time.time() - start:.0f} s")
    if status != 0:
        with open(console) as f:
            tail = "".join(f.readlines()[-15:])
        raise SystemExit(f"open-clip-starft demo: {title} failed (exit {status}); the end of {console}:\n{tail}")


def _common_args(data: str, logs: str, name: str, seed: int, epochs: int, lr: float, batch_size: int,
                 warmup: int) -> list[str]:
    return ["--train-data", data, "--dataset-type", "webdataset", "--device", "cpu", "--workers", "1",
            "--precision", "fp32",  # upstream's default "amp" is float16 autocast: several times slower on a CPU
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr), "--wd", "0.1",
            "--warmup", str(warmup), "--seed", str(seed), "--logs", logs, "--name", name, "--log-every-n-steps", "4",
            "--save-frequency", str(epochs)]  # only the last epoch's checkpoint (each one is ~40 MB)


def _write_pretrain_shards(out_dir: str, n: int, seed: int, p_background: float, samples_per_shard: int = 1024) -> str:
    """Balanced pre-training shards whose caption (``txt``) names the shape only ("a photo of a
    circle.") except for a ``p_background`` share of samples, captioned with the background too
    ("a photo of a circle on the water."). Returns the brace pattern."""
    def text(i: int, cls: int, bg: int) -> str:
        if random.Random(hash((seed, i))).random() < p_background:
            return demo_data.caption(cls, bg)
        return f"a photo of a {demo_data.CLASSNAMES[cls]}."
    return demo_data.brace_pattern(demo_data.write_shards(
        out_dir, n, seed=seed, biased=False, image_size=IMAGE_SIZE, samples_per_shard=samples_per_shard,
        prefix="pretrain", caption_fn=text))


def _export(checkpoint: str, template_dir: str, out_dir: str) -> str:
    """A training checkpoint as a ``local-dir:`` model (config from ``template_dir``)."""
    # OpenCLIP's loader takes the checkpoint's "state_dict" and drops DDP's "module." prefix
    return save_openclip(load_state_dict(checkpoint, weights_only=False), f"local-dir:{template_dir}", out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="open-clip-starft demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="starft-demo", help="folder for data, models, logs and results (default ./starft-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the runs (default 0)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    for name in ("zero-shot-pretrain", "flyp", "starft"):  # the demo's own runs: start them afresh
        shutil.rmtree(os.path.join(logs, name), ignore_errors=True)
    os.makedirs(logs, exist_ok=True)
    start = time.time()
    print(f"StarFT demo in {out}")

    print("  writing the built-in dataset (shapes on water, grass, sand, snow) as webdataset shards ...", end="", flush=True)
    stage_start = time.time()
    write = lambda split, n, biased, seed: demo_data.brace_pattern(demo_data.write_shards(
        os.path.join(out, "data", split), n, seed=seed, biased=biased, p_spurious=P_SPURIOUS, image_size=IMAGE_SIZE,
        samples_per_shard=128, prefix=split))
    pretrain = _write_pretrain_shards(os.path.join(out, "data", "pretrain"), PRETRAIN_SAMPLES, args.seed + 1,
                                      PRETRAIN_P_BACKGROUND)
    finetune = write("finetune", FINETUNE_SAMPLES, True, args.seed + 2)
    test = write("test", TEST_SAMPLES, False, args.seed + 3)
    classes = os.path.join(out, "data", "classnames.txt")
    with open(classes, "w") as f:
        f.write("\n".join(demo_data.CLASSNAMES) + "\n")
    descriptors = os.path.join(out, "data", "backgrounds.txt")
    with open(descriptors, "w") as f:
        f.write("# spurious descriptors for the demo: its backgrounds\n")
        f.writelines(f"{{}} {phrase}.\n" for phrase in demo_data.BACKGROUND_PHRASES.values())
    print(f" {time.time() - stage_start:.0f} s")

    init_dir = os.path.join(out, "models", "init")
    init = write_tiny_model(init_dir, seed=args.seed, image_size=IMAGE_SIZE)
    _run_stage("pre-training the zero-shot model (open_clip_train.main, captions; 1 in 10 names the background)",
               "open_clip_train.main", ["--model", init, *_common_args(pretrain, logs, "zero-shot-pretrain", args.seed, **PRETRAIN)],
               os.path.join(logs, "zero-shot-pretrain.console.txt"))
    zero_shot = _export(os.path.join(logs, "zero-shot-pretrain", "checkpoints", f"epoch_{PRETRAIN['epochs']}.pt"), init_dir,
                        os.path.join(out, "models", "zero-shot"))

    finetune_args = ["--model", zero_shot, "--starft-classnames", classes, "--starft-concepts", descriptors]
    for name, lam in (("flyp", "0"), ("starft", "0.5")):
        _run_stage(f"fine-tuning on the biased set: {name} (λ = {lam})", "open_clip_starft.main",
                   [*finetune_args, "--starft-lambda", lam, *_common_args(finetune, logs, name, args.seed, **FINETUNE)],
                   os.path.join(logs, f"{name}.console.txt"))

    print("  evaluating zero-shot on the balanced test set ('a photo of a {shape}.') ...", end="", flush=True)
    stage_start = time.time()
    # group shares of the fine-tuning set: a shape on its own background, or on one of the 3 others
    n_bg = len(demo_data.BACKGROUNDS)
    share = lambda g: P_SPURIOUS / len(demo_data.CLASSNAMES) if g // n_bg == g % n_bg else \
        (1 - P_SPURIOUS) / (len(demo_data.CLASSNAMES) * (n_bg - 1))
    results = {}
    models = {"zero-shot": zero_shot,
              "flyp": os.path.join(logs, "flyp", "checkpoints", f"epoch_{FINETUNE['epochs']}.pt"),
              "starft": os.path.join(logs, "starft", "checkpoints", f"epoch_{FINETUNE['epochs']}.pt")}
    tokenizer = open_clip.get_tokenizer(init)
    for name, source in models.items():
        if source.endswith(".pt"):
            source = _export(source, init_dir, os.path.join(out, "models", name))
        model, _, preprocess = open_clip.create_model_and_transforms(source)
        r = evaluate_zero_shot(model, tokenizer, preprocess, test, demo_data.CLASSNAMES)
        r["in_distribution"] = sum(share(g) * acc for g, acc in r["groups"].items())
        results[name] = r
    print(f" {time.time() - stage_start:.0f} s")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    print(f"\n  {'model':<10} {'accuracy':>9} {'worst group':>12} {'in-distribution':>16}")
    for name, r in results.items():
        print(f"  {name:<10} {r['top1']:>9.3f} {r['worst_group']:>12.3f} {r['in_distribution']:>16.3f}")
    print(f"  (accuracy: every group alike; in-distribution: groups weighted as in the fine-tuning set, "
          f"{P_SPURIOUS:.0%} on the shape's own background)")
    print(f"\n  checkpoints: {os.path.join(logs, '{flyp,starft}', 'checkpoints')}")
    print(f"  logs:        {os.path.join(logs, '<run>', 'out.log')}")
    print(f"  results:     {os.path.join(out, 'results.json')}")
    print(f"  done in {time.time() - start:.0f} s")
    return 0
