"""The Waterbirds-lite benchmark: pre-train CLIP-lite, fine-tune by each method, evaluate, record.

Protocols (each fine-tune is one ``python -m open_clip_starft.main`` run from the pre-trained
CLIP-lite, the same flags for every method but the StarFT ones):

- ``P1`` (the paper's): fine-tune on the split's source task (object classes on scenes with a
  natural object–scene correlation), then zero-shot on Waterbirds-lite and on held-out classes;
- ``P2``: fine-tune on the biased Waterbirds-lite train split, test on the balanced test split.

Methods: ``zero-shot`` (the pre-trained model), ``flyp`` (λ 0), ``starft`` (λ 0.5, background
descriptors), ``starft-l2`` (λ 2), ``starft-nomask`` (λ 0.5 without the same-class mask),
``starft-random`` (λ 0.5, random-word suffixes), ``wise-flyp`` / ``wise-starft`` (WiSE-FT α 0.5
between the zero-shot and the fine-tuned weights). Hyper-parameters are fixed in advance (no
selection; the validation split is reported beside the test split).
"""
from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from open_clip.factory import load_state_dict

from open_clip_starft.bench.stages import OFFLINE_ENV, run_stage, training_progress
from open_clip_starft.bench.waterbirds_lite.build import WB_GROUP_NAMES
from open_clip_starft.errors import StarftError
from open_clip_starft.eval.metrics import evaluate_zero_shot
from open_clip_starft.eval.progress import Progress
from open_clip_starft.eval.models import interpolate_state_dicts, run_checkpoints

METHODS = {
    "flyp": ["--starft-lambda", "0"],
    "starft": ["--starft-lambda", "0.5"],
    "starft-l2": ["--starft-lambda", "2"],
    "starft-nomask": ["--starft-lambda", "0.5", "--starft-no-mask"],
    "starft-random": ["--starft-lambda", "0.5", "--starft-suffix", "random"],
}
WISE = {"wise-flyp": "flyp", "wise-starft": "starft"}
WISE_ALPHA = 0.5
PROTOCOLS = {"P1": "source-train", "P2": "wb-train"}


@dataclass
class Schedule:
    """Optimisation settings of the pre-training run and of every fine-tune (all methods alike)."""
    pretrain_epochs: int = 8
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 128
    finetune_epochs: int = 3
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    warmup: int = 10


def _train_args(data: str, logs: str, name: str, seed: int, epochs: int, lr: float, batch_size: int, warmup: int,
                classnames: str) -> list[str]:
    return ["--train-data", data, "--dataset-type", "webdataset", "--device", "cpu", "--workers", "1",
            "--precision", "fp32", "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr),
            "--wd", "0.1", "--warmup", str(warmup), "--seed", str(seed), "--logs", logs, "--name", name,
            "--log-every-n-steps", "10", "--save-frequency", str(epochs),
            # MiniLM stays the pretrained sentence encoder: its transformer (LayerNorms too) is locked, its projection learns
            "--lock-text", "--lock-text-unlocked-layers", "0", "--lock-text-freeze-layer-norm",
            "--starft-classnames", classnames, "--starft-templates", "single"]


@dataclass
class Job:
    name: str
    args: list[str]
    logs: str

    @property
    def checkpoint(self) -> str:
        """The run's last end-of-epoch checkpoint (``epoch_N.pt``), or "" when it has none."""
        try:
            last = run_checkpoints(os.path.join(self.logs, self.name), "last")[0]
        except StarftError:  # no run folder, or no epoch_N.pt in it yet
            return ""
        return "" if last.endswith("epoch_latest.pt") else last

    @property
    def epochs(self) -> int:
        return int(self.args[self.args.index("--epochs") + 1])


def run_job(job: Job, threads: int = 1, log=None) -> float:
    """Run one training through ``open_clip_starft.main`` (skipped when its last checkpoint exists, resumed
    from its latest checkpoint when it has one); seconds. ``log``: a line with the run's epoch and percent
    every 30 s while it runs."""
    if job.checkpoint.endswith(f"epoch_{job.epochs}.pt"):
        return 0.0
    resume = ["--resume", "latest"] if os.path.isdir(os.path.join(job.logs, job.name)) else []
    poll = None if log is None else (lambda console: log(f"    {job.name}: {training_progress(console) or 'starting'}"))
    return run_stage("open_clip_starft.main", [*job.args, *resume], os.path.join(job.logs, f"{job.name}.console.txt"),
                     what=f"Waterbirds-lite run {job.name}", threads=threads, env=OFFLINE_ENV, on_poll=poll, poll_s=30.0)


def run_jobs(jobs: list[Job], parallel: int) -> dict[str, float]:
    """Run ``jobs``, ``parallel`` at a time, the machine's two cores shared among them; seconds per job.
    Progress: one unit per finished job (a bar on a terminal, lines in a log)."""
    seconds, lock = {}, threading.Lock()
    with Progress(len(jobs), "  fine-tunes", unit="run", interval_s=0.0) as progress:
        def one(job):
            seconds[job.name] = run_job(job, threads=max(1, 2 // parallel))
            with lock:
                progress.write(f"    {job.name}: {seconds[job.name]:.0f} s")
                progress.update(1)
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for future in [pool.submit(one, j) for j in jobs]:
                future.result()
    return seconds


def pretrain(out: str, manifest: dict, schedule: Schedule, seed: int, init_model: str) -> Job:
    """The pre-training job: contrastive, λ = 0, on the pre-training set's caption classes."""
    pre = manifest["pretrain"]
    data_dir = os.path.join(out, "data", "pretrain")
    job = Job("pretrain", ["--model", init_model, *_train_args(
        pre["pattern"], os.path.join(out, "logs"), "pretrain", seed, schedule.pretrain_epochs, schedule.pretrain_lr,
        schedule.pretrain_batch_size, 4 * schedule.warmup, os.path.join(data_dir, "classnames.txt")),
        "--starft-lambda", "0"], os.path.join(out, "logs"))
    return job


def finetune_jobs(out: str, manifest: dict, zero_shot: str, protocols, methods, train_seeds, schedule: Schedule) -> list[Job]:
    jobs = []
    for split, info in manifest["splits"].items():
        for protocol in protocols:
            data = info["sets"][PROTOCOLS[protocol]]
            classnames = os.path.join(os.path.dirname(_first_shard(data["pattern"])), "classnames.txt")
            for seed in train_seeds:
                for method in methods:
                    name = f"{protocol}-{split}-seed{seed}-{method}"
                    jobs.append(Job(name, ["--model", zero_shot, *_train_args(
                        data["pattern"], os.path.join(out, "logs"), name, seed, schedule.finetune_epochs,
                        schedule.finetune_lr, schedule.finetune_batch_size, schedule.warmup, classnames),
                        *METHODS[method]], os.path.join(out, "logs")))
    return jobs


def _first_shard(pattern: str) -> str:
    from open_clip_train.data import expand_urls
    return expand_urls(pattern)[0][0]


# -- evaluation --------------------------------------------------------------------------------------
class Evaluator:
    """Zero-shot accuracy of state dicts of one architecture on the Waterbirds-lite sets."""

    def __init__(self, zero_shot: str):
        import open_clip
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(zero_shot)
        self.tokenizer = open_clip.get_tokenizer(zero_shot)
        self.zero_shot_state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def state_of(self, checkpoint: str) -> dict:
        return load_state_dict(checkpoint, weights_only=False)  # OpenCLIP's: "state_dict", no "module."

    def evaluate(self, state: dict, sets: dict) -> dict:
        """``{set name: group metrics}`` for ``sets`` = {name: (pattern, classnames)}."""
        self.model.load_state_dict(state)
        return {name: evaluate_zero_shot(self.model, self.tokenizer, self.preprocess, pattern, classnames)
                for name, (pattern, classnames) in sets.items()}


def first_star_loss(log_path: str) -> float | None:
    """The Star term logged at a run's first step (≈ 0: the student starts as the teacher); None if none logged."""
    with open(log_path) as f:
        found = re.search(r"Star_loss: ([-0-9.e+naif]+)", f.read())
    return float(found.group(1)) if found else None


def _classnames(pattern: str) -> list[str]:
    with open(os.path.join(os.path.dirname(_first_shard(pattern)), "classnames.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def record(protocol: str, method: str, split: str, seed, metrics: dict, train_groups: dict, seconds=None) -> dict:
    """One JSON record: Waterbirds-lite test (balanced avg, worst group, per group, in-distribution
    accuracy weighted by the train split's group shares), validation, held-out classes."""
    test = metrics["wb-test"]
    total = sum(train_groups.values())
    in_dist = sum(test["groups"].get(int(g), 0.0) * n / total for g, n in train_groups.items())
    return {
        "protocol": protocol, "method": method, "split": split, "seed": seed,
        "avg": test["top1"], "worst_group": test["worst_group"],
        "groups": {WB_GROUP_NAMES[g]: acc for g, acc in sorted(test["groups"].items())},
        "in_dist": in_dist,
        "val_avg": metrics["wb-val"]["top1"], "val_worst_group": metrics["wb-val"]["worst_group"],
        "heldout": metrics["heldout-test"]["top1"],
        "train_seconds": seconds,
    }


def evaluate_runs(out: str, manifest: dict, zero_shot: str, protocols, methods, train_seeds,
                  seconds: dict) -> list[dict]:
    ev = Evaluator(zero_shot)
    records = []
    per_split = len(protocols) * (1 + len(train_seeds) * (len(methods) + sum(b in methods for b in WISE.values())))
    progress = Progress(len(manifest["splits"]) * per_split, "  evaluated models", unit="model")
    for split, info in manifest["splits"].items():
        sets = {k: (info["sets"][k]["pattern"], _classnames(info["sets"][k]["pattern"]))
                for k in ("wb-test", "wb-val", "heldout-test")}
        wb_groups = info["sets"]["wb-train"]["groups"]
        zs = ev.evaluate(ev.zero_shot_state, sets)
        for protocol in protocols:
            records.append(record(protocol, "zero-shot", split, None, zs, wb_groups))
            progress.update(1)
            for seed in train_seeds:
                states = {}
                for method in methods:
                    name = f"{protocol}-{split}-seed{seed}-{method}"
                    ckpt = Job(name, [], os.path.join(out, "logs")).checkpoint
                    if not ckpt:
                        raise StarftError(f"Waterbirds-lite: run {name} has no checkpoint: run the 'run' stage first")
                    states[method] = ev.state_of(ckpt)
                    records.append(record(protocol, method, split, seed, ev.evaluate(states[method], sets), wb_groups,
                                          seconds.get(name)))
                    records[-1]["star_loss_step0"] = first_star_loss(os.path.join(out, "logs", name, "out.log"))
                    progress.update(1)
                for wise, base in WISE.items():
                    if base in states:
                        mixed = interpolate_state_dicts(ev.zero_shot_state, states[base], WISE_ALPHA)
                        records.append(record(protocol, wise, split, seed, ev.evaluate(mixed, sets), wb_groups))
                        progress.update(1)
    progress.close()
    return records
