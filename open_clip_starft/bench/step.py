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
to a list of records (one per model/device/batch/accumulation/precision).

A SigLIP model (one with a ``logit_bias``) trains with OpenCLIP's ``SigLipLoss``; ``--beside MODEL`` times a
second model in the same run and records its StarFT/FLYP ratio beside the first's (e.g. SigLIP beside its
CLIP). ``--accum-freq K``: each step is one optimizer step over K micro-batches of ``--batch-size``, as in
training (FLYP and StarFT; the naive port does not accumulate), so memory is per accumulated step.

The step itself is the host's (``host.step.accumulated_losses``, ``host.batch.Batch``, ``host.teacher.Teacher``,
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
from contextlib import contextmanager

import open_clip
import torch
from open_clip import get_input_dtype
from open_clip.loss import SigLipLoss
from open_clip_train.precision import get_autocast
from torch.utils.flop_counter import FlopCounterMode

from open_clip_starft.bench.common import add_record, default_device, today
from open_clip_starft.tools.tiny_model import build_tiny_model
from open_clip_starft.errors import StarftError, one_line_errors
from open_clip_starft.host.batch import Batch
from open_clip_starft.host.step import accumulated_losses
from open_clip_starft.host.teacher import Teacher
from open_clip_starft.host.text_prefix import install_prefix_encoding
from open_clip_starft.method.captions import CaptionBuilder, load_classnames
from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.method.loss import StarLoss

VARIANTS = ("flyp", "starft", "naive")
ACCUM_VARIANTS = ("flyp", "starft")  # --accum-freq > 1: the naive port has no accumulation


def offline_tokenizer(model_name: str, model):
    """The model's tokenizer; for a Hugging Face tokenizer (SigLIP's), which would be downloaded, OpenCLIP's
    built-in BPE tokenizer with the ids folded into the model's vocabulary: the text tower does the same
    work for any ids (the benchmark times, it does not score)."""
    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    if not text_cfg.get("hf_tokenizer_name"):
        return open_clip.get_tokenizer(model_name), None
    builtin = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    vocab = text_cfg["vocab_size"]
    return (lambda texts: builtin(texts) % vocab), "OpenCLIP's BPE ids mod the vocabulary (offline)"



@contextmanager
def counted_attention():
    """PyTorch's fused attention fast path (``nn.MultiheadAttention`` in eval mode without gradient: the
    teacher) hides its matrix products from ``FlopCounterMode``; off while counting, the same products are
    counted (the numbers are unchanged)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class StepBench:
    """One model, optimizer, teacher and batch; ``step(variant)`` runs one optimizer step."""

    def __init__(self, model_name: str, batch_size: int, precision: str, device: str, seed: int = 0,
                 with_teacher: bool = True, accum_freq: int = 1):
        torch.manual_seed(seed)
        self.tokenizer_note = None
        if model_name in ("tiny", "tiny-siglip"):
            self.model, _ = build_tiny_model(seed, siglip=model_name == "tiny-siglip")
            tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=self.model.context_length)
        else:
            self.model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
            tokenizer, self.tokenizer_note = offline_tokenizer(model_name, self.model)
        self.siglip = getattr(self.model, "logit_bias", None) is not None
        self.device = torch.device(device)
        self.model.to(self.device)
        # the teacher's spurious-caption features from its cache, warm after the first step as in training
        self.teacher = Teacher(self.model, text_cache_mb=1024) if with_teacher else None
        install_prefix_encoding(self.model)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)
        self.loss = StarLoss(SigLipLoss()) if self.siglip else StarLoss()
        self.autocast = get_autocast(precision, device_type=self.device.type)
        self.scaler = torch.amp.GradScaler(device=self.device.type) if precision == "amp" else None

        rng = random.Random(seed)
        builder = CaptionBuilder(load_classnames("imagenet"), descriptors=load_descriptors("background"))
        size = self.model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        dtype = get_input_dtype(precision)
        self.batches = []  # accum_freq micro-batches of batch_size
        for _ in range(accum_freq):
            labels = [rng.randrange(builder.num_classes) for _ in range(batch_size)]
            pairs = [builder(c, rng) for c in labels]
            spurious = tokenizer([p[1] for p in pairs]).to(self.device)
            self.batches.append(Batch(
                torch.randn(batch_size, 3, *size, device=self.device, dtype=dtype),
                tokenizer([p[0] for p in pairs]).to(self.device), spurious, torch.tensor(labels, device=self.device),
                keys=self.teacher.cache_keys(spurious) if self.teacher is not None else None))
        self.batch = self.batches[0]
        self.images, self.texts, self.spurious, self.labels = self.batch[:4]

    def _micro_losses(self, variant: str):
        """Each micro-batch's losses, to be backpropagated in turn (one micro-batch without --accum-freq)."""
        if variant == "naive":
            return [self._naive_losses()]
        lam = 0.0 if variant == "flyp" else 0.5
        return (losses for losses, _, _ in accumulated_losses(
            self.model, self.teacher if lam else None, self.loss, self.batches, lam, self.autocast, trim=True))

    def _naive_losses(self):
        """A direct port: separate full-length text forwards, teacher image and text every step."""
        with self.autocast():
            out = self.model(self.images, self.texts)
            spurious = self.model.encode_text(self.spurious, normalize=True)
            with torch.no_grad():
                t_image = self.teacher.model.encode_image(self.images, normalize=True)
                t_spurious = self.teacher.model.encode_text(self.spurious, normalize=True)
                t_scale = self.teacher.model.logit_scale.exp()
            losses = self.loss(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"),
                               spurious_features=spurious, teacher_image_features=t_image,
                               teacher_spurious_features=t_spurious, class_ids=self.labels,
                               teacher_logit_scale=t_scale, teacher_logit_bias=getattr(self.teacher.model, "logit_bias", None),
                               output_dict=True)
            return {**losses, "star_loss": 0.5 * losses["star_loss"]}

    def step(self, variant: str) -> None:
        """One optimizer step: backward of each micro-batch's losses in turn, then the optimizer."""
        self.optimizer.zero_grad(set_to_none=True)
        for losses in self._micro_losses(variant):
            total = sum(losses.values())
            (self.scaler.scale(total) if self.scaler is not None else total).backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
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
        with FlopCounterMode(display=False) as counter, counted_attention():
            self.step(variant)
        return counter.get_total_flops()

    def teacher_image_flops(self) -> int:
        with FlopCounterMode(display=False) as counter, counted_attention(), torch.inference_mode(), self.autocast():
            self.teacher.model.encode_image(self.images)
        return counter.get_total_flops()

    def teacher_mb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.teacher.model.parameters()) / 2 ** 20


def _variants(accum_freq: int) -> tuple[str, ...]:
    return VARIANTS if accum_freq == 1 else ACCUM_VARIANTS


def _peak_memory_mb(args, model: str, variant: str) -> float:
    """Peak memory of ``variant``'s steps (an accumulated step with ``--accum-freq``), model, optimizer state
    and teacher included: the CUDA allocator's peak with nothing else of this process allocated, or a fresh
    process's peak RSS on CPU."""
    if args.device.startswith("cuda"):
        bench = StepBench(model, args.batch_size, args.precision, args.device, with_teacher=variant != "flyp",
                          accum_freq=args.accum_freq)
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
    cmd = [sys.executable, "-m", "open_clip_starft.bench.step", "--model", model, "--batch-size", str(args.batch_size),
           "--precision", args.precision, "--device", args.device, "--accum-freq", str(args.accum_freq),
           "--memory-of", variant]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def bench_model(args, model: str) -> dict:
    """The record of one model: median step times (variants interleaved), FLOPs, peak memory."""
    variants = _variants(args.accum_freq)
    memory = {v: _peak_memory_mb(args, model, v) for v in variants}  # first: on CUDA, alone in the process
    bench = StepBench(model, args.batch_size, args.precision, args.device, accum_freq=args.accum_freq)
    seconds = bench.time_steps(variants, args.steps)
    flops = {v: bench.flops(v) for v in variants}
    teacher_image = bench.teacher_image_flops()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    samples = args.batch_size * args.accum_freq
    record = {
        "model": model, "loss": "SigLipLoss" if bench.siglip else "ClipLoss", "device": args.device,
        "device_name": device_name, "cpu_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "accum_freq": args.accum_freq, "precision": args.precision, "steps": args.steps,
        **{f"{v}_step_s": seconds[v] for v in variants},
        "starft_over_flyp": seconds["starft"] / seconds["flyp"],
        **{f"{v}_flops": flops[v] for v in variants},
        "teacher_image_forward_flops": teacher_image,
        "flop_floor_ratio": (flops["flyp"] + teacher_image * args.accum_freq) / flops["flyp"],
        "starft_flop_ratio": flops["starft"] / flops["flyp"],
        "images_per_s": {v: samples / s for v, s in seconds.items()},
        "peak_mem_mb": memory, "teacher_mb": bench.teacher_mb(),
        "starft_mem_over_flyp_mb": memory["starft"] - memory["flyp"],
        "torch": torch.__version__, "date": today(),
    }
    if "naive" in variants:
        record.update(starft_over_naive=seconds["starft"] / seconds["naive"],
                      naive_over_flyp=seconds["naive"] / seconds["flyp"])
    if bench.tokenizer_note:
        record["tokens"] = bench.tokenizer_note
    return record


def bench_step(args) -> dict:
    if args.memory_of:  # child process: run only this variant, print its peak resident memory (MB)
        bench = StepBench(args.model, args.batch_size, args.precision, args.device,
                          with_teacher=args.memory_of != "flyp", accum_freq=args.accum_freq)
        bench.step(args.memory_of)  # the first step allocates the optimizer state
        # Model creation can peak higher than training; Linux resets the peak (VmHWM) on request.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for _ in range(2):
            bench.step(args.memory_of)
        with open("/proc/self/status") as f:
            print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)
        return {}
    record = bench_model(args, args.model)
    if args.beside:  # another model in the same run (e.g. the CLIP of a SigLIP), its ratio beside this one's
        beside = bench_model(args, args.beside)
        record["beside"] = {k: beside[k] for k in ("model", "loss", "flyp_step_s", "starft_step_s", "starft_over_flyp",
                                                   "starft_flop_ratio", "peak_mem_mb")}
        record["starft_over_flyp_vs_beside"] = record["starft_over_flyp"] / beside["starft_over_flyp"]
    return record


def print_step_table(record: dict) -> None:
    r = record
    variants = _variants(r["accum_freq"])
    accum = f" × {r['accum_freq']} micro-batches (one optimizer step)" if r["accum_freq"] > 1 else ""
    print(f"model {r['model']} ({r['loss']}), {r['device']} ({r['device_name']}, {r['cpu_threads']} threads), "
          f"batch {r['batch_size']}{accum}, {r['precision']}, median of {r['steps']} interleaved steps")
    print(f"{'step':<8}{'s/step':>10}{'images/s':>10}{'GFLOP':>10}{'peak MB':>10}")
    for v in variants:
        print(f"{v:<8}{r[v + '_step_s']:>10.3f}{r['images_per_s'][v]:>10.1f}{r[v + '_flops'] / 1e9:>10.1f}{r['peak_mem_mb'][v]:>10.0f}")
    naive = (f"   StarFT/naive {r['starft_over_naive']:.3f}   naive/FLYP {r['naive_over_flyp']:.3f}"
             if "naive" in variants else "")
    print(f"StarFT/FLYP {r['starft_over_flyp']:.3f}{naive}   FLOP floor {r['flop_floor_ratio']:.3f}   "
          f"StarFT FLOPs/FLYP {r['starft_flop_ratio']:.3f}")
    print(f"memory per optimizer step: StarFT − FLYP {r['starft_mem_over_flyp_mb']:.0f} MB, teacher {r['teacher_mb']:.0f} MB")
    if "beside" in r:
        b = r["beside"]
        print(f"beside, same run: {b['model']} ({b['loss']}) StarFT/FLYP {b['starft_over_flyp']:.3f}; "
              f"{r['model']}'s ratio / {b['model']}'s = {r['starft_over_flyp_vs_beside']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft bench step", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, tiny-siglip, or an OpenCLIP model name (random init), "
                        "e.g. ViT-B-16 or ViT-B-16-SigLIP (SigLIP models train with SigLipLoss)")
    parser.add_argument("--beside", metavar="MODEL", help="also time this model in the same run and record its "
                        "StarFT/FLYP ratio beside --model's (e.g. --model ViT-B-16-SigLIP --beside ViT-B-16)")
    parser.add_argument("--accum-freq", type=int, default=1, help="micro-batches of --batch-size per optimizer step, "
                        "as training's --accum-freq (flyp and starft only); memory is per accumulated step")
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
    if args.batch_size < 1 or args.steps < 1 or args.accum_freq < 1:
        raise StarftError("--batch-size, --steps and --accum-freq must be ≥ 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise StarftError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    record = bench_step(args)
    if record:
        print_step_table(record)
        if args.out:
            add_record(args.out, record, ("model", "device", "batch_size", "accum_freq", "precision"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
