"""``open-clip-starft bench eval`` (alias ``eval-bench``): eval throughput and zero-shot head cost per model, as a table.

Throughput is images/s through ``eval``'s whole path (JPEG decode, preprocessing, image tower,
head, metrics); the head cost is class names × templates (80 OpenAI templates by default).

    open-clip-starft bench eval --models tiny,ViT-B-16 --images 64 --head-classes 10

Models are random-init (speed does not depend on the weights). The head cost is measured on
``--head-classes`` ImageNet classes and scaled to 1000 classes (linear in the class count).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import open_clip
import torch
from PIL import Image

from open_clip_starft.bench.common import default_device, today
from open_clip_starft.data.files import write_json
from open_clip_starft.errors import StarftError, one_line_errors
from open_clip_starft.eval.sets import EvalSetSpec, PreparedSet, prepare_set, resolve_templates
from open_clip_starft.eval.evaluator import Evaluator
from open_clip_starft.eval.metrics import HeadCache
from open_clip_starft.tools.commands import add_alias


def _model(name: str, device: str):
    if name == "tiny":
        from open_clip_starft.tools.tiny_model import build_tiny_model
        model, _ = build_tiny_model(0)
        _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_image_size=32)
        tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        except RuntimeError:
            raise StarftError(f"unknown model {name!r} in --models: use tiny or an OpenCLIP model name") from None
        tokenizer = open_clip.get_tokenizer(name)
    return model.to(device).eval(), preprocess, tokenizer


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def _write_images(root: str, n: int, size: int, classes: int = 4) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def training_images_per_s(name: str, batch_size: int, steps: int, device: str) -> float:
    """Images/s of our StarFT training step (``bench.step.StepBench``, λ 0.5, fp32) on ``name``."""
    from open_clip_starft.bench.step import StepBench
    bench = StepBench(name, batch_size, "fp32", device)
    return batch_size / bench.time_steps(["starft"], steps)["starft"]


def validation_overhead(row: dict, train_ips: float, val_images: int, train_images: int, val_classes: int) -> dict:
    """The cost of ``--starft-val`` per epoch beside the epoch's training: one set of ``val_images`` images
    and a head of ``val_classes`` classes × the row's templates (rebuilt each evaluation: the weights changed),
    against ``train_images`` training images at ``train_ips``."""
    val_s = val_images / row["images_per_s"] + row["head_seconds"] * val_classes / row["head_classes"]
    train_s = train_images / train_ips
    return {"train_images_per_s": train_ips, "val_images": val_images, "val_classes": val_classes,
            "train_images": train_images, "val_seconds_per_epoch": val_s, "train_seconds_per_epoch": train_s,
            "val_overhead": val_s / train_s}


def bench_model(name: str, images: int, batch_size: int, head_classes: int, templates: str, device: str, workers: int) -> dict:
    model, preprocess, tokenizer = _model(name, device)
    size = _image_size(model)
    with tempfile.TemporaryDirectory() as tmp:
        _write_images(tmp, images, size)
        spec = EvalSetSpec(name="bench", root=tmp, format="folder", classnames=[f"class {i}" for i in range(4)], templates="single")
        prepared = prepare_set(spec)
        evaluator = Evaluator(model, tokenizer, preprocess, device=device, batch_size=batch_size, workers=workers)
        evaluator.evaluate(prepared)  # warm-up; builds the head
        start = time.perf_counter()
        record = evaluator.evaluate(prepared)  # the head is kept: images only
        eval_seconds = time.perf_counter() - start
    names = open_clip.IMAGENET_CLASSNAMES[:head_classes]
    temps, _ = resolve_templates(templates)
    head_set = PreparedSet(name="head", format="folder", root="", head_classnames=list(names), templates=temps,
                           class_map=None, classnames=list(names))
    heads = HeadCache(model, tokenizer, device)
    heads.prepare([head_set])
    return {
        "model": name, "device": device, "threads": torch.get_num_threads(), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "image_size": size, "images": record["n"], "batch_size": batch_size, "eval_seconds": eval_seconds,
        "images_per_s": record["n"] / eval_seconds, "head_classes": head_classes, "templates": len(temps),
        "head_seconds": heads.seconds, "head_seconds_per_1000_classes": heads.seconds * 1000 / head_classes,
        "torch": torch.__version__, "date": today(),
    }


def table(rows: list[dict]) -> str:
    head = ["model", "params (M)", "px", "eval images/s", "head: classes × templates", "head s", "head s / 1000 classes"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['image_size']} | {r['images_per_s']:.1f} | "
                     f"{r['head_classes']} × {r['templates']} | {r['head_seconds']:.2f} | {r['head_seconds_per_1000_classes']:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft bench eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--models", default="tiny", help="comma list: tiny and/or OpenCLIP model names (default tiny)")
    parser.add_argument("--images", type=int, default=256, help="images per model (default 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (default 0)")
    parser.add_argument("--head-classes", type=int, default=50, help="classes of the measured head (default 50)")
    parser.add_argument("--templates", default="openai", help="templates of the head (default openai: 80)")
    parser.add_argument("--device", default=default_device(), help="cuda (default when available) or cpu")
    t = parser.add_argument_group("the cost of --starft-val beside training (--train-steps > 0)")
    t.add_argument("--train-steps", type=int, default=0, metavar="N",
                   help="also time N StarFT training steps in the same run and report the per-epoch overhead of "
                        "--starft-val (default 0: off)")
    t.add_argument("--train-batch-size", type=int, default=32, help="training batch of those steps (default 32)")
    t.add_argument("--val-images", type=int, default=1000, help="images of the validation set (default 1000)")
    t.add_argument("--val-classes", type=int, default=10, help="classes of its zero-shot head (default 10)")
    t.add_argument("--train-images", type=int, default=10000, help="training images per epoch (default 10000)")
    parser.add_argument("--out", metavar="FILE", help="also write the rows as JSON (default: only print the table)")
    add_alias(parser, "--json", "--out", dest="out")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.head_classes < 1 or args.head_classes > 1000:
        raise StarftError("--images and --batch-size must be ≥ 1 and --head-classes in 1..1000")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.append(bench_model(name, args.images, args.batch_size, args.head_classes, args.templates, args.device, args.workers))
        if args.train_steps > 0:
            train_ips = training_images_per_s(name, args.train_batch_size, args.train_steps, args.device)
            rows[-1].update(validation_overhead(rows[-1], train_ips, args.val_images, args.train_images,
                                                args.val_classes))
        print(f"  {name}: {rows[-1]['images_per_s']:.1f} images/s, head {rows[-1]['head_seconds']:.2f} s", file=sys.stderr)
    print(f"eval throughput on {args.device} ({torch.get_num_threads()} threads)\n")
    print(table(rows))
    for r in rows:
        if "val_overhead" in r:
            print(f"\n{r['model']}: --starft-val on {r['val_images']} images ({r['val_classes']} classes × "
                  f"{r['templates']} templates) costs {r['val_seconds_per_epoch']:.1f} s per epoch of "
                  f"{r['train_images']} training images ({r['train_seconds_per_epoch']:.1f} s at "
                  f"{r['train_images_per_s']:.1f} images/s): {100 * r['val_overhead']:.1f} % overhead")
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
