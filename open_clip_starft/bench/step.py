"""``open-clip-starft bench step``: speed and memory of one StarFT training step, beside FLYP and a naive port.

Times, interleaved in one run, three training steps on the same model and batch:

- ``flyp``: our training step with λ = 0 (contrastive fine-tuning only);
- ``starft``: our StarFT step (one student text forward for both caption kinds, text towers cut
  at the longest caption, teacher under inference mode, the teacher's spurious-caption features
  from its cache, warm as in training once each caption has been seen);
- ``naive``: a direct port (student on captions and spurious captions separately, full-length
  text, teacher image and text forward every step).

It reports median step times and their ratios, FLOPs per step (``torch.utils.flop_counter``)
with the floor ratio ``(FLYP + teacher image forward) / FLYP`` (the teacher's image forward is
the one extra cost no exact trick removes), and peak memory of each step (CUDA: allocator peak;
CPU: peak resident memory of a fresh process running only that step, model and optimizer
included, measured over the training steps). Prints a table; ``--out FILE`` adds the JSON record
to a list of records (one per model/device/batch/precision).

The step itself is the host's (``host.step.starft_losses``, ``host.batch.Batch``, ``host.teacher.Teacher``,
``host.text_prefix``; public names only): the benchmark times the code training runs.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import subprocess
import sys
import time

import open_clip
import torch
from open_clip import get_input_dtype
from open_clip_train.precision import get_autocast
from torch.utils.flop_counter import FlopCounterMode

from open_clip_starft.bench.common import add_record, default_device, today
from open_clip_starft.tools.tiny_model import build_tiny_model
from open_clip_starft.errors import StarftError, one_line_errors
from open_clip_starft.host.batch import Batch
from open_clip_starft.host.step import starft_losses
from open_clip_starft.host.teacher import Teacher
from open_clip_starft.host.text_prefix import install_prefix_encoding
from open_clip_starft.method.captions import CaptionBuilder, load_classnames
from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.method.loss import StarLoss

VARIANTS = ("flyp", "starft", "naive")



class StepBench:
    """One model, optimizer, teacher and batch; ``step(variant)`` runs one optimizer step."""

    def __init__(self, model_name: str, batch_size: int, precision: str, device: str, seed: int = 0,
                 with_teacher: bool = True):
        torch.manual_seed(seed)
        if model_name == "tiny":
            self.model, _ = build_tiny_model(seed)
            tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=self.model.context_length)
        else:
            self.model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
            tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.model.to(self.device)
        # the teacher's spurious-caption features from its cache, warm after the first step as in training
        self.teacher = Teacher(self.model, text_cache_mb=1024) if with_teacher else None
        install_prefix_encoding(self.model)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)
        self.loss = StarLoss()
        self.autocast = get_autocast(precision, device_type=self.device.type)
        self.scaler = torch.amp.GradScaler(device=self.device.type) if precision == "amp" else None

        rng = random.Random(seed)
        builder = CaptionBuilder(load_classnames("imagenet"), descriptors=load_descriptors("background"))
        labels = [rng.randrange(builder.num_classes) for _ in range(batch_size)]
        pairs = [builder(c, rng) for c in labels]
        size = self.model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        dtype = get_input_dtype(precision)
        self.images = torch.randn(batch_size, 3, *size, device=self.device, dtype=dtype)
        self.texts = tokenizer([p[0] for p in pairs]).to(self.device)
        self.spurious = tokenizer([p[1] for p in pairs]).to(self.device)
        self.labels = torch.tensor(labels, device=self.device)
        self.batch = Batch(self.images, self.texts, self.spurious, self.labels,
                           keys=self.teacher.cache_keys(self.spurious) if self.teacher is not None else None)

    def _losses(self, variant: str):
        if variant == "naive":
            return self._naive_losses()
        lam = 0.0 if variant == "flyp" else 0.5
        losses, _, _ = starft_losses(self.model, self.teacher, self.loss, self.batch, lam, self.autocast, trim=True)
        return losses

    def _naive_losses(self):
        """A direct port: separate full-length text forwards, teacher image and text every step."""
        with self.autocast():
            out = self.model(self.images, self.texts)
            spurious = self.model.encode_text(self.spurious, normalize=True)
            with torch.no_grad():
                t_image = self.teacher.model.encode_image(self.images, normalize=True)
                t_spurious = self.teacher.model.encode_text(self.spurious, normalize=True)
                t_scale = self.teacher.model.logit_scale.exp()
            losses = self.loss(out["image_features"], out["text_features"], out["logit_scale"],
                               spurious_features=spurious, teacher_image_features=t_image,
                               teacher_spurious_features=t_spurious, class_ids=self.labels,
                               teacher_logit_scale=t_scale, output_dict=True)
            return {**losses, "star_loss": 0.5 * losses["star_loss"]}

    def step(self, variant: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(self._losses(variant).values())
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, variants, steps: int) -> dict:
        """Median seconds per step of each variant, the variants interleaved step by step."""
        for v in variants:  # warm-up
            self.step(v)
        times = {v: [] for v in variants}
        for _ in range(steps):
            for v in variants:
                self.sync()
                start = time.perf_counter()
                self.step(v)
                self.sync()
                times[v].append(time.perf_counter() - start)
        return {v: statistics.median(t) for v, t in times.items()}

    def flops(self, variant: str) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step(variant)
        return counter.get_total_flops()

    def teacher_image_flops(self) -> int:
        with FlopCounterMode(display=False) as counter, torch.inference_mode(), self.autocast():
            self.teacher.model.encode_image(self.images)
        return counter.get_total_flops()

    def teacher_mb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.teacher.model.parameters()) / 2 ** 20


def _peak_memory_mb(args, variant: str) -> float:
    """Peak memory of ``variant``'s steps, model, optimizer state and teacher included: the CUDA allocator's
    peak with nothing else of this process allocated, or a fresh process's peak RSS on CPU."""
    if args.device.startswith("cuda"):
        bench = StepBench(args.model, args.batch_size, args.precision, args.device, with_teacher=variant != "flyp")
        bench.step(variant)  # the first step allocates the optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            bench.step(variant)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        del bench
        torch.cuda.empty_cache()
        return peak
    cmd = [sys.executable, "-m", "open_clip_starft.bench.step", "--model", args.model, "--batch-size", str(args.batch_size),
           "--precision", args.precision, "--device", args.device, "--memory-of", variant]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def bench_step(args) -> dict:
    if args.memory_of:  # child process: run only this variant, print its peak resident memory (MB)
        bench = StepBench(args.model, args.batch_size, args.precision, args.device, with_teacher=args.memory_of != "flyp")
        bench.step(args.memory_of)  # the first step allocates the optimizer state
        # Model creation can peak higher than training; Linux resets the peak (VmHWM) on request.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for _ in range(2):
            bench.step(args.memory_of)
        with open("/proc/self/status") as f:
            print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)
        return {}
    memory = {v: _peak_memory_mb(args, v) for v in VARIANTS}  # first: on CUDA, alone in the process
    bench = StepBench(args.model, args.batch_size, args.precision, args.device)
    seconds = bench.time_steps(VARIANTS, args.steps)
    flops = {v: bench.flops(v) for v in VARIANTS}
    teacher_image = bench.teacher_image_flops()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    return {
        "model": args.model, "device": args.device, "device_name": device_name,
        "cpu_threads": torch.get_num_threads(), "batch_size": args.batch_size, "precision": args.precision,
        "steps": args.steps,
        "flyp_step_s": seconds["flyp"], "starft_step_s": seconds["starft"], "naive_step_s": seconds["naive"],
        "starft_over_flyp": seconds["starft"] / seconds["flyp"], "starft_over_naive": seconds["starft"] / seconds["naive"],
        "naive_over_flyp": seconds["naive"] / seconds["flyp"],
        "flyp_flops": flops["flyp"], "starft_flops": flops["starft"], "naive_flops": flops["naive"],
        "teacher_image_forward_flops": teacher_image,
        "flop_floor_ratio": (flops["flyp"] + teacher_image) / flops["flyp"],
        "starft_flop_ratio": flops["starft"] / flops["flyp"],
        "images_per_s": {v: args.batch_size / s for v, s in seconds.items()},
        "peak_mem_mb": memory, "teacher_mb": bench.teacher_mb(),
        "starft_mem_over_flyp_mb": memory["starft"] - memory["flyp"],
        "torch": torch.__version__, "date": today(),
    }


def print_step_table(record: dict) -> None:
    r = record
    print(f"model {r['model']}, {r['device']} ({r['device_name']}, {r['cpu_threads']} threads), batch {r['batch_size']}, "
          f"{r['precision']}, median of {r['steps']} interleaved steps")
    print(f"{'step':<8}{'s/step':>10}{'images/s':>10}{'GFLOP':>10}{'peak MB':>10}")
    for v in VARIANTS:
        print(f"{v:<8}{r[v + '_step_s']:>10.3f}{r['images_per_s'][v]:>10.1f}{r[v + '_flops'] / 1e9:>10.1f}{r['peak_mem_mb'][v]:>10.0f}")
    print(f"StarFT/FLYP {r['starft_over_flyp']:.3f}   StarFT/naive {r['starft_over_naive']:.3f}   "
          f"naive/FLYP {r['naive_over_flyp']:.3f}   FLOP floor {r['flop_floor_ratio']:.3f}   StarFT FLOPs/FLYP {r['starft_flop_ratio']:.3f}")
    print(f"memory: StarFT − FLYP {r['starft_mem_over_flyp_mb']:.0f} MB, teacher {r['teacher_mb']:.0f} MB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft bench step", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, or an OpenCLIP model name (random init), e.g. ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "amp", "amp_bf16", "amp_bfloat16"),
                        help="OpenCLIP's names; the model's weights stay fp32 (default fp32)")
    parser.add_argument("--device", default=default_device(), help="cuda (default when available) or cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--out", metavar="FILE", help="add the record to this JSON list of records, e.g. docs/bench/step.json "
                        "(default: only print the table)")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        raise StarftError("--batch-size and --steps must be ≥ 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise StarftError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    record = bench_step(args)
    if record:
        print_step_table(record)
        if args.out:
            add_record(args.out, record, ("model", "device", "batch_size", "precision"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
