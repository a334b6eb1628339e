#!/usr/bin/env python
"""The GPU check: what a CUDA machine should confirm, in one run of at most ``--budget-s`` (8 minutes).

    python scripts/gpu_check.py                 # on a CUDA machine: records in docs/bench/gpu-*.json
    python scripts/gpu_check.py --dry-run       # the same plan on the CPU, tiny model and sizes

The plan, each part one subprocess through ``tools.stages.run_stage`` with its own time limit (what the
budget has left), each record written as soon as its part ends (a later failure loses nothing):

1. ``step`` (``gpu-step.json``): ``open-clip-starft bench step`` for ViT-B-16 (random init) at
   ``amp_bf16``, batch 256: FLYP vs StarFT vs the naive port, s/step, images/s, FLOPs, peak memory.
2. ``train`` (``gpu-train.json``): 50 StarFT steps (λ 0.5) through ``open_clip_starft.main`` at
   ``amp_bf16`` with ``--torchcompile``, ViT-B-16 through ``--model ViT-B-16`` (random init, nothing
   downloaded), on shards of the demo's shapes written here; samples/s, the losses, the checkpoint.
3. ``ddp`` (``gpu-ddp.json``): the same training on 2 processes (torchrun, NCCL; 25 steps each over the
   same shards) when 2 GPUs exist; a ``skipped`` record otherwise.

``gpu-check.json`` sums up: each part's status (``ok``, ``failed``, ``timed out``, ``skipped``), seconds,
the machine. ``--dry-run`` runs all three on the CPU (the tiny model, batch 4-8, a few steps, the 2-process
run on gloo) and writes the same records with ``"dry_run": true`` under ``./gpu-check-dry-run`` unless
``--out`` is given, so CPU numbers never overwrite GPU ones. Exit status 0 when no part failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time

import torch

from open_clip_starft.bench.common import today
from open_clip_starft.tools.stages import run_stage
from open_clip_starft.demo import data as demo_data
from open_clip_starft.tools.tiny_model import write_tiny_model
from open_clip_starft.errors import StarftError, one_line, one_line_errors

PLANS = {
    # the check itself: sizes that show a data-centre GPU's speed and memory
    "gpu": dict(device="cuda", model="ViT-B-16", precision="amp_bf16", bench_batch=256, bench_steps=5,
                train_batch=128, train_steps=50, image_size=64, workers=8, ddp_steps=25, torchcompile=True, env={}),
    # --dry-run: the same plan on the CPU in seconds; --torchcompile is passed, but inductor's CPU compilation
    # (minutes on 2 cores) is switched off by torch's own TORCH_COMPILE_DISABLE: the flag's path, not the compiler
    "dry-run": dict(device="cpu", model="tiny", precision="amp_bf16", bench_batch=4, bench_steps=1,
                    train_batch=8, train_steps=4, image_size=32, workers=1, ddp_steps=2, torchcompile=True,
                    env={"TORCH_COMPILE_DISABLE": "1"}),
}
PARTS = ("step", "train", "ddp")
PART_LIMIT_S = {"step": 200, "train": 240, "ddp": 180}
"""The most a part may take (seconds), within what the budget has left."""

_TRAIN_LINE = re.compile(r"Train Epoch: \d+ .*?Batch \(t\): ([0-9.]+), ([0-9.e+]+)/s, ([0-9.e+]+)/s/gpu")


def machine() -> dict:
    """The machine a record was measured on."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"gpus": gpus, "device_name": torch.cuda.get_device_name(0) if gpus else (platform.processor() or platform.machine()),
            "cpu_cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda, "date": today()}


def write_json(path: str, obj) -> None:
    """Write ``obj`` to ``path`` under a temporary name first (a killed check never leaves half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".partial", path)


def train_data(work: str, plan: dict, samples: int) -> tuple[str, str]:
    """``samples`` images of the demo's shapes as shards (enough for 2 processes × the plan's workers), and
    their class-names file; returns ``(brace pattern, classnames path)``. Written once per sample count:
    the 1- and the 2-process runs read the same shards."""
    folder = os.path.join(work, f"shards-{samples}")
    done = os.path.join(folder, "complete.txt")
    if os.path.isfile(done):
        with open(done) as f:
            pattern = f.read().strip()
    else:
        per_shard = max(1, math.ceil(samples / (4 * max(1, plan["workers"]))))
        pattern = demo_data.brace_pattern(demo_data.write_shards(folder, samples, seed=0, biased=True,
                                                                 image_size=plan["image_size"],
                                                                 samples_per_shard=per_shard, prefix="train"))
        with open(done, "w") as f:
            f.write(pattern + "\n")
    classnames = os.path.join(work, "classnames.txt")
    with open(classnames, "w") as f:
        f.write("\n".join(demo_data.CLASSNAMES) + "\n")
    return pattern, classnames


def train_args(plan: dict, model: str, data: str, classnames: str, logs: str, name: str, steps: int, processes: int) -> list[str]:
    """``open_clip_starft.main`` flags of a StarFT run of exactly ``steps`` optimizer steps, one epoch."""
    return ["--model", model, "--train-data", data, "--dataset-type", "webdataset",
            "--train-num-samples", str(steps * plan["train_batch"] * processes),
            "--batch-size", str(plan["train_batch"]), "--epochs", "1", "--lr", "1e-5", "--wd", "0.1", "--warmup", "5",
            "--precision", plan["precision"], "--device", plan["device"], "--workers", str(plan["workers"]),
            "--seed", "0", "--logs", logs, "--name", name, "--log-every-n-steps", "5", "--save-frequency", "1",
            "--starft-lambda", "0.5", "--starft-classnames", classnames,
            *(["--torchcompile"] if plan["torchcompile"] else [])]


def read_training(logs: str, name: str) -> dict:
    """Figures of a finished run from its ``out.log``: samples/s (median over the logged steps after the
    first, which carries compilation), every logged loss, whether all were finite, its checkpoint."""
    with open(os.path.join(logs, name, "out.log"), errors="replace") as f:
        log = f.read()
    lines = _TRAIN_LINE.findall(log)
    values = lambda key: [float(v) for v in re.findall(rf"{re.escape(key)}: ([-0-9.e+naif]+)", log)]  # noqa: E731
    losses = {key: values(key) for key in ("Contrastive_loss", "Star_loss", "Loss")}
    steady = [float(rate) for _, rate, _ in lines[1:]] or [float(rate) for _, rate, _ in lines]
    folder = os.path.join(logs, name, "checkpoints")
    return {"logged_steps": len(lines),
            "samples_per_s": statistics.median(steady) if steady else None,
            "samples_per_s_per_gpu": statistics.median(float(g) for _, _, g in lines[1:] or lines) if lines else None,
            "losses": losses, "losses_finite": all(math.isfinite(v) for vs in losses.values() for v in vs),
            "checkpoints": sorted(os.listdir(folder)) if os.path.isdir(folder) else []}


class Check:
    """The plan's parts, run in order within one time budget; records written as each ends."""

    def __init__(self, args):
        self.dry_run = args.dry_run
        self.plan = PLANS["dry-run" if args.dry_run else "gpu"]
        self.out = os.path.abspath(args.out or ("gpu-check-dry-run" if args.dry_run else os.path.join("docs", "bench")))
        self.work = os.path.abspath(args.work or os.path.join(self.out, "work"))
        self.deadline = time.time() + args.budget_s
        self.budget_s = args.budget_s
        self.summary = {"dry_run": self.dry_run, "plan": self.plan, "budget_s": args.budget_s,
                        "machine": machine(), "parts": {}}
        self._model = None

    def model(self) -> str:
        """The ``--model`` of the training parts: ViT-B-16 by name, or the tiny model as a local-dir folder."""
        if self._model is None:
            self._model = (self.plan["model"] if self.plan["model"] != "tiny" else
                           write_tiny_model(os.path.join(self.work, "tiny-model"), image_size=self.plan["image_size"]))
        return self._model

    def limit(self, part: str) -> float:
        left = self.deadline - time.time()
        if left < 10:
            raise TimeoutError(f"the {self.budget_s:.0f} s budget is spent")
        return min(PART_LIMIT_S[part], left)

    def run(self, parts) -> int:
        os.makedirs(self.work, exist_ok=True)
        start = time.time()
        for part in PARTS:
            if part not in parts:
                continue
            part_start = time.time()
            try:
                record = getattr(self, part)()
                status = record.pop("status", "ok")
            except TimeoutError as e:
                record, status = {"error": one_line(e)}, "timed out"
            except StarftError as e:
                text = one_line(e, 2000)
                record = {"error": text}
                status = "timed out" if "limit and was stopped" in text else "failed"
            record = {"check": part, "status": status, "dry_run": self.dry_run, **machine(),
                      "seconds": time.time() - part_start, **record}
            write_json(os.path.join(self.out, f"gpu-{part}.json"), record)
            self.summary["parts"][part] = {"status": status, "seconds": record["seconds"],
                                           **({"error": record["error"]} if "error" in record else {})}
            print(f"gpu check: {part}: {status} ({record['seconds']:.0f} s)"
                  + (f": {record['error'][:300]}" if "error" in record else ""), flush=True)
        self.summary["seconds"] = time.time() - start
        write_json(os.path.join(self.out, "gpu-check.json"), self.summary)
        print(f"gpu check: records in {self.out} ({self.summary['seconds']:.0f} s of {self.budget_s:.0f})")
        return 0 if all(p["status"] in ("ok", "skipped") for p in self.summary["parts"].values()) else 1

    def step(self) -> dict:
        """``bench step``: the three steps side by side at the plan's model, precision and batch."""
        p = self.plan
        out = os.path.join(self.work, "step.json")
        if os.path.exists(out):
            os.remove(out)
        run_stage("open_clip_starft.bench.step",
                  ["--model", p["model"], "--precision", p["precision"], "--batch-size", str(p["bench_batch"]),
                   "--steps", str(p["bench_steps"]), "--device", p["device"], "--out", out],
                  os.path.join(self.work, "step.console.txt"), what="bench step", env=p["env"], timeout=self.limit("step"))
        with open(out) as f:
            bench, = json.load(f)
        return {"bench": bench}

    def _train(self, part: str, name: str, steps: int, processes: int) -> dict:
        p = self.plan
        data, classnames = train_data(self.work, p, steps * p["train_batch"] * processes)
        logs = os.path.join(self.work, "logs")
        if os.path.isdir(os.path.join(logs, name)):  # a fresh run each time (upstream refuses an existing name)
            shutil.rmtree(os.path.join(logs, name))
        launcher = None
        if processes > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                        "-m", "--"]
        flags = train_args(p, self.model(), data, classnames, logs, name, steps, processes)
        seconds = run_stage("open_clip_starft.main", flags, os.path.join(self.work, f"{name}.console.txt"),
                            what=f"the {part} run", env=p["env"], timeout=self.limit(part), launcher=launcher)
        figures = read_training(logs, name)
        record = {"model": p["model"], "precision": p["precision"], "torchcompile": p["torchcompile"], "env": p["env"],
                  "batch_size_per_process": p["train_batch"], "processes": processes, "steps": steps,
                  "image_size": p["image_size"], "run_seconds": seconds, **figures,
                  "command": "python -m open_clip_starft.main " + " ".join(flags)}
        if not figures["losses_finite"] or not figures["checkpoints"] or not figures["logged_steps"]:
            record.update(status="failed", error="the run ended without finite logged losses and a checkpoint: "
                          f"see {os.path.join(logs, name, 'out.log')}")
        return record

    def train(self) -> dict:
        """50 StarFT steps at the plan's precision, with --torchcompile, on one device."""
        return self._train("train", "gpu-train", self.plan["train_steps"], 1)

    def ddp(self) -> dict:
        """The same run on 2 processes: 2 GPUs (NCCL) on a GPU machine, 2 CPU processes (gloo) in a dry run."""
        if not self.dry_run and torch.cuda.device_count() < 2:
            return {"status": "skipped", "reason": f"{torch.cuda.device_count()} GPU(s): a 2-process run needs 2"}
        return self._train("ddp", "gpu-ddp", self.plan["ddp_steps"], 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU with a tiny model and sizes")
    parser.add_argument("--out", metavar="DIR", help="where gpu-*.json go (default docs/bench; ./gpu-check-dry-run for --dry-run)")
    parser.add_argument("--work", metavar="DIR", help="shards, logs and checkpoints of the runs (default OUT/work)")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole check's time limit in seconds (default 480)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts to run (default {','.join(PARTS)})")
    return parser


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        raise StarftError(f"--parts {args.parts!r}: a comma list of {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        raise StarftError("no CUDA device is visible here: run the check on a GPU machine, or pass --dry-run "
                          "to run its plan on the CPU")
    return Check(args).run(parts)


main = one_line_errors(_main, "gpu_check")


if __name__ == "__main__":
    sys.exit(main())
