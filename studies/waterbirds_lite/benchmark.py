"""The Waterbirds-lite benchmark (v2): pre-train one CLIP-lite per unit, fine-tune it over a StarFT grid,
choose on validation, evaluate, record.

A *unit* is one pre-trained zero-shot model: a split (``crops-sN``, ``shared-sN`` or ``identity-sN``) × a pre-training
seed (``unit_name``). Runs that share a unit are not independent; the report's intervals are over units.

Protocols (each fine-tune is one ``python -m open_clip_starft.main`` run from the unit's zero-shot model,
the same flags for every setting but the StarFT ones):

- ``P1`` (the paper's): fine-tune on the split's multi-class source task (object classes and the train-part
  bird species on biased scenes), then zero-shot on Waterbirds-lite and on held-out classes; in-distribution
  accuracy is source-test's. The fine-tune length is chosen per unit among ``Schedule.p1_epochs`` by FLYP's
  source-VALIDATION accuracy (``choose_p1_epochs``), before any StarFT run;
- ``P2``: fine-tune on the biased Waterbirds-lite train split (two classes: with the same-class mask every
  column of a row names the other class, so the Star term compares descriptors only; see the docs).

Settings (``tools.sweep.Setting``/``make_grid``): FLYP (λ 0) and StarFT over λ × schedule × descriptor set
(``background``, the shipped set, or ``scenes``, the scenes' own phrases). Per unit, protocol and training
seed, the StarFT setting is chosen by ``tools.sweep.select`` on validation (Waterbirds-lite val worst group;
ties by validation in-distribution accuracy): test numbers are never read by a choice. WiSE-FT curves
(α 0.1 … 0.9; α 0 is the zero-shot model, α 1 the fine-tune) for FLYP and for the chosen StarFT.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from open_clip_starft.data.files import merge_json, read_json, write_json, write_text
from open_clip_starft.tools.stages import OFFLINE_ENV, run_stage, training_progress
from studies.waterbirds_lite.build import PLACES, WB_CLASSNAMES, WB_GROUP_NAMES
from studies.waterbirds_lite.lit import text_pooled
from open_clip_starft.errors import StarftError
from open_clip_starft.eval.models import checkpoint_state, interpolate_state_dicts, run_checkpoints
from open_clip_starft.eval.progress import Progress
from open_clip_starft.tools.sweep import Setting, select

PROTOCOLS = {"P1": "source-train", "P2": "wb-train"}
WISE_ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 10))
WISE_ALPHAS_FINE = tuple(round(0.05 * i, 2) for i in range(1, 20))  # v3: α every 0.05 (0 and 1 are the ends)
MACHINE = f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.processor() or 'unknown CPU'})"
TEMPLATE = "a photo of a {}."


@dataclass
class Schedule:
    """Optimisation settings of the pre-training runs and of every fine-tune (all settings alike)."""
    pretrain_epochs: int = 8
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 128
    finetune_epochs: int = 3           # P2
    p1_epochs: tuple = (3, 8)          # P1 candidates, chosen on source-val by FLYP
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    warmup: int = 10
    wise_alphas: tuple = WISE_ALPHAS  # WiSE-FT points evaluated between the zero-shot model and a fine-tune
    # WiSE-FT of the validation-chosen StarFT too (a figure's curve; no reading uses it): off where evaluation time
    # is short (each point is every evaluation set once more)
    wise_of_selected: bool = True
    # LiT-style pre-training of a pretrained image tower: its trunk locked (OpenCLIP's --lock-image) but for its
    # last ``pretrain_unlocked_groups`` layer groups; the projections (and MiniLM's, whose transformer is always
    # locked) learn. Fine-tunes (FLYP, StarFT) unlock the whole image tower, as CLIP fine-tuning does.
    pretrain_lock_image: bool = False
    pretrain_unlocked_groups: int = 0
    # "host": pre-training through ``open_clip_starft.main`` (``pretrain``); "lit-cached": both towers locked, only
    # the projections learn, on trunk and MiniLM outputs computed once (``lit.pretrain``; the trunk in eval mode)
    pretrain_recipe: str = "host"
    # StarFT's teacher's BatchNorm statistics (``--starft-teacher-batchnorm``): "running" (the host's default), or
    # "batch", as the train-mode student's, so that the Star term is 0 at the first step with a BatchNorm tower
    teacher_batchnorm: str = "running"
    # every fine-tune (FLYP and StarFT) keeps the zero-shot BatchNorm statistics (``--starft-freeze-bn-stats``), so
    # the model evaluated (eval mode) is the model trained and the Star term is 0 at the first step
    freeze_bn_stats: bool = False
    # every fine-tune's weights in channels-last layout (``--starft-channels-last``): the layout of oneDNN's fast CPU
    # convolutions, with the same numbers up to float summation order
    channels_last: bool = False


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

    @property
    def done(self) -> bool:
        return self.checkpoint.endswith(f"epoch_{self.epochs}.pt")

    @property
    def flags_path(self) -> str:
        """``LOGS/NAME.flags.json``: the flags the run was started with, OUT written as ``OUT``."""
        return os.path.join(self.logs, f"{self.name}.flags.json")

    def portable_flags(self) -> list[str]:
        out = os.path.dirname(os.path.abspath(self.logs))
        return [a.replace(out, "OUT") for a in self.args]

    def check_flags(self) -> None:
        """Refuse a run folder started with other flags (another scale or recipe in the same OUT): reusing or
        resuming it would mix recipes without a word. Run folders from before this check have no record."""
        recorded = read_json(self.flags_path, None)
        if recorded is not None and recorded != self.portable_flags():
            changed = sorted(set(recorded) ^ set(self.portable_flags()))
            raise StarftError(f"Waterbirds-lite run {self.name} in {self.logs} was started with other flags "
                              f"(differing: {' '.join(changed[:6])}): use a fresh --out for another scale or recipe")


def run_job(job: Job, threads: int = 1, log=None) -> float:
    """Run one training through ``open_clip_starft.main`` (skipped when its last checkpoint exists, resumed
    from its latest checkpoint when it has one; refused when its folder was started with other flags);
    seconds. ``log``: a line with the run's epoch and percent every 30 s while it runs."""
    job.check_flags()
    if job.done:
        return 0.0
    if not os.path.exists(job.flags_path):
        os.makedirs(job.logs, exist_ok=True)
        write_json(job.flags_path, job.portable_flags())
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


# -- pre-training ----------------------------------------------------------------------------------
def unit_name(split: str, pretrain_seed: int) -> str:
    """A unit: one pre-trained zero-shot model (``{split}-p{pretrain_seed}``); runs sharing it are not independent."""
    return f"{split}-p{pretrain_seed}"


def parse_unit(unit: str) -> tuple[str, int]:
    split, _, seed = unit.rpartition("-p")
    return split, int(seed)


def _first_shard(pattern: str) -> str:
    from open_clip_train.data import expand_urls
    return expand_urls(pattern)[0][0]


def _classnames_path(pattern: str) -> str:
    return os.path.join(os.path.dirname(_first_shard(pattern)), "classnames.txt")


def _classnames(pattern: str) -> list[str]:
    with open(_classnames_path(pattern)) as f:
        return [line.strip() for line in f if line.strip()]


def pretrain(out: str, manifest: dict, split: str, pretrain_seed: int, schedule: Schedule, init_model: str) -> Job:
    """The pre-training job of unit (``split``, ``pretrain_seed``): contrastive, λ = 0, on the split's own
    pre-training set (its train scene photographs only), seeded by ``pretrain_seed``; the image trunk locked
    when ``schedule.pretrain_lock_image`` (LiT). Never with OpenCLIP's ``--lock-image-freeze-bn-stats``: it swaps
    timm's ``BatchNormAct2d`` for a plain ``FrozenBatchNorm2d`` and so drops EfficientNet's activations. The
    locked trunk's BatchNorm layers run in train mode: batch statistics in the forward, running statistics
    adapted to the composites, which the zero-shot model keeps (so trunk features are not exactly cacheable)."""
    pre = manifest["splits"][split]["sets"]["pretrain"]
    unit = unit_name(split, pretrain_seed)
    lock = (["--lock-image", "--lock-image-unlocked-groups", str(schedule.pretrain_unlocked_groups)]
            if schedule.pretrain_lock_image else [])
    return Job(f"pretrain-{unit}", ["--model", init_model, *_train_args(
        pre["pattern"], os.path.join(out, "logs"), f"pretrain-{unit}", pretrain_seed, schedule.pretrain_epochs,
        schedule.pretrain_lr, schedule.pretrain_batch_size, 4 * schedule.warmup, _classnames_path(pre["pattern"])),
        *lock, "--starft-lambda", "0"], os.path.join(out, "logs"))


def unit_seed(unit: str) -> int:
    """The seed of unit ``{variant}-s{N}-p{M}``'s LiT pre-training (its projections' initialisation and batch
    order), drawn from ``SeedSequence([N, M])``: units of different splits or pre-training seeds never share it."""
    split, pretrain_seed = parse_unit(unit)
    split_seed = int(split.rpartition("-s")[2])
    return int(np.random.SeedSequence([split_seed, pretrain_seed]).generate_state(1)[0])


def zero_shot_check(model: str, info: dict) -> dict:
    """The zero-shot model's Waterbirds-lite VALIDATION accuracy and worst group, and its source-val accuracy
    (never a test set): the competence check of a pre-trained unit."""
    ev = Evaluator(model, info, roles=("wb-val", "source-val"))
    return validation_numbers(ev.evaluate(ev.zero_shot_state))


def validation_numbers(metrics: dict) -> dict:
    """The validation numbers of one model from ``Evaluator.evaluate``'s ``metrics`` (with roles ``wb-val`` and
    ``source-val``): Waterbirds-lite validation accuracy, worst group and groups by name, source-val accuracy."""
    val = metrics["wb-val"]
    return {"val_avg": val["top1"], "val_worst_group": val["worst_group"],
            "val_groups": {WB_GROUP_NAMES[g]: a for g, a in sorted(val["groups"].items())},
            "source_val": metrics["source-val"]["top1"]}


# -- fine-tuning -----------------------------------------------------------------------------------
def scene_descriptors(out: str, manifest_scenes_phrases: list[str]) -> str:
    """``OUT/scenes.txt``: one descriptor template per scene phrase ("{} on the beach."); returns its path."""
    path = os.path.join(out, "scenes.txt")
    text = "".join(f"{{}} {p}.\n" for p in manifest_scenes_phrases)
    if not os.path.exists(path) or open(path).read() != text:
        write_text(path, text)
    return path


def descriptor_label(spec: str | None) -> str | None:
    """The record's ``descriptors``: a concept name, or a descriptor file's name without extension."""
    return None if spec is None else os.path.splitext(os.path.basename(spec))[0]


def finetune_job(out: str, info: dict, unit: str, protocol: str, seed: int, setting: Setting, epochs: int,
                 schedule: Schedule) -> Job:
    data = info["sets"][PROTOCOLS[protocol]]
    name = f"{protocol}-{unit}-seed{seed}-{setting.name}-e{epochs}"
    return Job(name, ["--model", f"local-dir:{os.path.join(out, 'models', unit, 'zero-shot')}", *_train_args(
        data["pattern"], os.path.join(out, "logs"), name, seed, epochs, schedule.finetune_lr,
        schedule.finetune_batch_size, schedule.warmup, _classnames_path(data["pattern"])), *setting.train_args(),
        *(["--starft-teacher-batchnorm", schedule.teacher_batchnorm] if setting.lam and
          schedule.teacher_batchnorm != "running" else []),
        *(["--starft-freeze-bn-stats"] if schedule.freeze_bn_stats else []),
        *(["--starft-channels-last"] if schedule.channels_last else [])], os.path.join(out, "logs"))


def choose_p1_epochs(out: str, manifest: dict, units: list[str], seeds, schedule: Schedule, parallel: int,
                     seconds: dict, log=print) -> dict:
    """P1's fine-tune length per unit and seed: FLYP trained for each of ``schedule.p1_epochs``, the one with the
    highest source-VALIDATION accuracy (ties: the shorter) kept. ``OUT/p1_epochs.json``:
    ``{unit: {seed: {"source_val": {epochs: acc}, "chosen": epochs}}}``. ``seconds``: filled with the runs' times."""
    path = os.path.join(out, "p1_epochs.json")
    chosen = json.load(open(path)) if os.path.exists(path) else {}
    flyp = Setting(0.0)
    jobs = {(u, s, e): finetune_job(out, manifest["splits"][parse_unit(u)[0]], u, "P1", s, flyp, e, schedule)
            for u in units for s in seeds for e in schedule.p1_epochs}
    seconds.update({k: v for k, v in run_jobs([j for j in jobs.values() if not j.done], parallel).items() if v})
    for u in units:
        info = manifest["splits"][parse_unit(u)[0]]
        for s in seeds:
            entry = chosen.setdefault(u, {}).get(str(s))
            if entry and set(entry["source_val"]) == {str(e) for e in schedule.p1_epochs}:
                continue
            ev = Evaluator(_zero_shot_dir(out, u), info, roles=("source-val",))
            acc = {str(e): ev.evaluate(ev.state_of(jobs[(u, s, e)].checkpoint))["source-val"]["top1"]
                   for e in schedule.p1_epochs}
            best = max(schedule.p1_epochs, key=lambda e: (acc[str(e)], -e))
            chosen[u][str(s)] = {"source_val": acc, "chosen": best}
            log(f"  P1 {u} seed {s}: source-val " + ", ".join(f"{e} ep {100 * a:.1f} %" for e, a in acc.items())
                + f" → {best} epochs")
            # merged into the file as it is now: another call on other units may have added some meanwhile
            merge_json(path, functools.partial(_with_choice, u, str(s), chosen[u][str(s)]))
    return chosen


def _with_choice(unit: str, seed: str, choice: dict, on_disk: dict) -> dict:
    """``on_disk`` with P1's choice of ``unit`` × ``seed`` added (``merge_json``'s update)."""
    return {**on_disk, unit: {**on_disk.get(unit, {}), seed: choice}}


def grid_jobs(out: str, manifest: dict, units: list[str], protocols, seeds, grid: list[Setting], schedule: Schedule,
              p1_epochs: dict) -> list[tuple[dict, Job]]:
    """``(run description, job)`` for every unit × protocol × seed × setting."""
    jobs = []
    for u in units:
        info = manifest["splits"][parse_unit(u)[0]]
        for protocol in protocols:
            for s in seeds:
                epochs = p1_epochs[u][str(s)]["chosen"] if protocol == "P1" else schedule.finetune_epochs
                for setting in grid:
                    jobs.append(({"unit": u, "protocol": protocol, "seed": s, "setting": setting, "epochs": epochs},
                                 finetune_job(out, info, u, protocol, s, setting, epochs, schedule)))
    return jobs


def _zero_shot_dir(out: str, unit: str) -> str:
    return f"local-dir:{os.path.join(out, 'models', unit, 'zero-shot')}"


# -- evaluation ------------------------------------------------------------------------------------
class _LockedTextModel:
    """The model as the zero-shot head builder sees it (``encode_text``), with the locked MiniLM's pooled
    outputs computed once per token row (exact: the same values as the model's own ``encode_text``)."""

    def __init__(self, ev: "Evaluator"):
        self.ev = ev

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        ev, text = self.ev, getattr(self.ev.model, "text", None)
        if not ev._frozen_text or not hasattr(text, "pooler"):
            return ev.model.encode_text(tokens, normalize=normalize)
        rows = [tuple(row.tolist()) for row in tokens]
        missing = [r for r in dict.fromkeys(rows) if r not in ev._pooled]
        if missing:
            ev._pooled.update(zip(missing, text_pooled(ev.model, torch.tensor(missing, dtype=tokens.dtype))))
        features = text.proj(torch.stack([ev._pooled[r] for r in rows]))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


class Evaluator:
    """Zero-shot accuracy of state dicts of one unit's architecture on its sets, through the one evaluator
    (``eval.evaluator.Evaluator``), the preprocessed images of each set read once and kept in memory
    (``[N, 3, H, W]`` float32 per set) and the locked text transformer's outputs computed once per caption."""

    ROLES = ("wb-test", "wb-val", "heldout-test", "source-test", "source-val")

    def __init__(self, zero_shot: str, info: dict, roles=ROLES, batch_size: int = 250):
        import open_clip
        from open_clip_starft.eval.evaluator import Evaluator as ZeroShotEvaluator
        from open_clip_starft.eval.sets import EvalSetSpec, prepare_set
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(zero_shot)
        # channels-last weights: torch's CPU convolutions (oneDNN) run the EfficientNet's depthwise layers much
        # faster so, and every model a unit evaluates is loaded into these parameters (load_state_dict keeps
        # their layout); features equal the default layout's up to float summation order
        self.model.to(memory_format=torch.channels_last)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(zero_shot)
        self.zero_shot_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.sets = {}
        for role in roles:
            pattern = info["sets"][role]["pattern"]
            self.sets[role] = prepare_set(EvalSetSpec(name=role, root=pattern, format="wds",
                                                      classnames=_classnames(pattern), templates=[TEMPLATE]))
        self.scorer = ZeroShotEvaluator(self.model, self.tokenizer, self.preprocess, batch_size=batch_size,
                                        cache_images=True, head_model=_LockedTextModel(self))

        # the text transformer (MiniLM) is locked in every run: its pooled outputs are computed once per caption
        # and reused while the loaded weights' transformer equals the zero-shot one (checked per load)
        self._transformer = {k: v for k, v in self.zero_shot_state.items() if k.startswith("text.transformer.")}
        self._pooled: dict[tuple, torch.Tensor] = {}
        self._frozen_text = True
        # two_class_terms' teacher side per (descriptors, seed) when the teacher is ``zero_shot_state`` (as for every
        # fine-tune of a unit): its test features are computed once, not once per model
        self.teacher_terms: dict[tuple, tuple] = {}

    def load(self, state: dict) -> None:
        """Load ``state`` into the model; note whether its text transformer is the zero-shot one."""
        self.model.load_state_dict(state)
        self.model.eval()
        self._frozen_text = all(torch.equal(state[k], v) for k, v in self._transformer.items())
        self.scorer.weights_changed()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """``[N, D]`` normalised text features of ``captions`` for the loaded weights (``encode_text``'s values)."""
        return _LockedTextModel(self).encode_text(self.tokenizer(captions), normalize=True)

    def state_of(self, checkpoint: str) -> dict:
        return checkpoint_state(checkpoint)[0]  # the one safe reader: weights only, "state_dict", no "module."

    @torch.no_grad()
    def head(self, names: list[str]) -> torch.Tensor:
        """``[D, K]`` normalised text features of ``TEMPLATE`` per class name, for the loaded weights."""
        return self.encode_text([TEMPLATE.format(n) for n in names]).T

    @torch.no_grad()
    def features(self, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image features [N, D], labels [N], groups [N])`` of set ``role`` for the loaded weights."""
        feats, labels, groups = [], [], []
        for images, lab, grp, _names, _bad in self.scorer.cached_batches(self.sets[role]):
            if images is not None:
                feats.append(self.model.encode_image(images, normalize=True))
                labels.append(lab)
                groups.append(grp)
        return torch.cat(feats), torch.cat(labels), torch.cat(groups)

    def evaluate(self, state: dict) -> dict:
        """``{role: record}`` of the weights ``state`` on every set (the evaluator's records: ``top1``,
        ``worst_group``, ``avg_group``, ``groups`` by group id, …)."""
        self.load(state)
        out = {}
        for role, prepared in self.sets.items():
            record = self.scorer.evaluate(prepared, label=role)
            out[role] = {**record, "groups": {int(g): acc for g, acc in record["groups"].items()}}
        return out


@torch.no_grad()
def two_class_terms(ev: Evaluator, state: dict, teacher: dict, descriptors: list[str], batch_size: int,
                    seed: int = 0) -> dict:
    """The two-class property on Waterbirds-lite test for weights ``state`` against the zero-shot ``teacher``
    (both state dicts of ``ev``'s architecture): the Star term with and without the same-class mask
    (``method.loss.star_loss``, the teacher's logit scale, batches of ``batch_size`` in set order, spurious
    captions "a photo of a {class} {descriptor}." with one descriptor per sample drawn from ``seed``), and the
    class margin ``t·(x·y_true − x·y_other)`` of the student per group and per background (place)."""
    from open_clip_starft.method.loss import star_loss
    rng = np.random.default_rng(seed)

    def encode(weights):
        ev.load(weights)
        x, labels, groups = ev.features("wb-test")
        captions = [d.replace("{}", TEMPLATE.format(WB_CLASSNAMES[int(c)]).rstrip(".")) for c, d in
                    zip(labels, chosen)]
        return x, ev.encode_text(captions), labels, groups, ev.head(list(WB_CLASSNAMES))

    n = sum(len(b[1]) for b in ev.scorer.cached_batches(ev.sets["wb-test"]) if b[0] is not None)
    chosen = [descriptors[int(i)] for i in rng.integers(len(descriptors), size=n)]
    key = (tuple(descriptors), seed)
    teacher_terms = ev.teacher_terms.get(key) if teacher is ev.zero_shot_state else None
    if teacher_terms is None:
        tx, ts, labels, groups, _ = encode(teacher)
        teacher_terms = (tx, ts, labels, groups, float(ev.model.logit_scale.exp()))
        if teacher is ev.zero_shot_state:
            ev.teacher_terms[key] = teacher_terms
    tx, ts, labels, groups, scale = teacher_terms
    x, s, _, _, head = encode(state)
    terms = {}
    for key, mask in (("star_masked", True), ("star_unmasked", False)):
        values = [float(star_loss(x[i:i + batch_size], s[i:i + batch_size], tx[i:i + batch_size],
                                  ts[i:i + batch_size], labels[i:i + batch_size], logit_scale=scale,
                                  mask_same_class=mask)) for i in range(0, n, batch_size)]
        terms[key] = sum(values) / len(values)
    logits = scale * x @ head
    margin = logits.gather(1, labels[:, None])[:, 0] - logits.gather(1, 1 - labels[:, None])[:, 0]
    terms["margin"] = {WB_GROUP_NAMES[g]: float(margin[groups == g].mean()) for g in range(4) if (groups == g).any()}
    terms["margin_by_background"] = {p: float(margin[groups % 2 == i].mean()) for i, p in enumerate(PLACES)}
    return terms


def first_star_loss(log_path: str) -> float | None:
    """The Star term logged at a run's first step (≈ 0: the student starts as the teacher); None if none logged."""
    if not os.path.exists(log_path):
        return None
    with open(log_path) as f:
        found = re.search(r"Star_loss: ([-0-9.e+naif]+)", f.read())
    return float(found.group(1)) if found else None


def _in_dist(metrics: dict, train_groups: dict) -> float:
    total = sum(train_groups.values())
    return sum(metrics["groups"].get(int(g), 0.0) * n / total for g, n in train_groups.items())


def record(protocol: str, method: str, unit: str, metrics: dict, info: dict, *, seed=None, setting: Setting | None = None,
           alpha=None, epochs=None, seconds=None) -> dict:
    """One JSON record of an evaluated model. ``avg``/``worst_group``/``groups``: Waterbirds-lite test
    (balanced); ``in_dist``: P1 source-test accuracy, P2 Waterbirds-lite test weighted by the train split's group
    shares; ``val_*`` the same on validation (wb-val; P1 ``val_in_dist``: source-val); ``heldout``: held-out
    classes (zero-shot)."""
    split, pretrain_seed = parse_unit(unit)
    test, val, groups = metrics["wb-test"], metrics["wb-val"], info["sets"]["wb-train"]["groups"]
    if protocol == "P1":
        in_dist, val_in_dist = metrics["source-test"]["top1"], metrics["source-val"]["top1"]
    else:
        in_dist, val_in_dist = _in_dist(test, groups), _in_dist(val, groups)
    lam = None if setting is None else setting.lam
    return {
        "protocol": protocol, "method": method, "unit": unit, "split": split, "variant": info.get("variant"),
        "pretrain_seed": pretrain_seed, "seed": seed, "lam": lam,
        "schedule": None if setting is None else setting.schedule,
        "descriptors": None if setting is None else descriptor_label(setting.descriptors),
        "alpha": alpha, "epochs": epochs,
        "avg": test["top1"], "worst_group": test["worst_group"],
        "groups": {WB_GROUP_NAMES[g]: acc for g, acc in sorted(test["groups"].items())},
        "in_dist": in_dist, "val_avg": val["top1"], "val_worst_group": val["worst_group"], "val_in_dist": val_in_dist,
        "heldout": metrics["heldout-test"]["top1"], "selected": False, "train_seconds": seconds,
        "fine_tune_seed": seed, "wall_s": seconds, "machine": MACHINE,
    }


def evaluate_unit(out: str, info: dict, unit: str, protocols, seeds, grid: list[Setting], schedule: Schedule,
                  p1_epochs: dict, seconds: dict, progress=None) -> list[dict]:
    """Every record of one unit: zero-shot (per protocol), each grid run, the validation choice among the StarFT
    runs (``selected``), WiSE-FT curves of FLYP and of the chosen StarFT, and the two-class terms (test) of FLYP
    and every StarFT run."""
    from open_clip_starft.method.descriptors import load_descriptors
    ev = Evaluator(_zero_shot_dir(out, unit), info)
    zs_state = ev.zero_shot_state
    zs = ev.evaluate(zs_state)
    records = []
    tick = (lambda: progress.update(1)) if progress is not None else (lambda: None)
    for protocol in protocols:
        records.append(record(protocol, "zero-shot", unit, zs, info))
        records[-1].update(two_class_terms(ev, zs_state, zs_state, load_descriptors("background"),
                                           schedule.finetune_batch_size))
        tick()
        for s in seeds:
            epochs = p1_epochs[unit][str(s)]["chosen"] if protocol == "P1" else schedule.finetune_epochs
            rows, states = [], {}
            for setting in grid:
                job = finetune_job(out, info, unit, protocol, s, setting, epochs, schedule)
                if not job.done:
                    raise StarftError(f"Waterbirds-lite: run {job.name} has no final checkpoint: run the 'run' stage first")
                states[setting] = ev.state_of(job.checkpoint)
                r = record(protocol, setting.method, unit, ev.evaluate(states[setting]), info, seed=s, setting=setting,
                           epochs=epochs, seconds=seconds.get(job.name))
                r["star_loss_step0"] = first_star_loss(os.path.join(job.logs, job.name, "out.log"))
                r.update(two_class_terms(ev, states[setting], zs_state,
                                         load_descriptors(setting.descriptors or "background"),
                                         schedule.finetune_batch_size))
                rows.append(r)
                tick()
            if any(r["lam"] for r in rows):
                chosen = select(rows)  # validation fields only
                chosen["selected"] = True
            records += rows
            for row, setting in zip(rows, grid):
                if setting.lam == 0 or (row["selected"] and schedule.wise_of_selected):
                    for a in schedule.wise_alphas:
                        mixed = interpolate_state_dicts(zs_state, states[setting], a)
                        records.append(record(protocol, f"wise-{setting.method}", unit, ev.evaluate(mixed), info,
                                              seed=s, setting=setting, alpha=a, epochs=epochs))
                        tick()
    return records


def unit_records(out: str, info: dict, unit: str, protocols, seeds, grid: list[Setting], schedule: Schedule,
                 p1_epochs: dict, seconds: dict, progress=None) -> list[dict]:
    """``evaluate_unit``'s records, kept in ``OUT/records/UNIT.json`` with the settings that made them: a unit
    evaluated once is read back, never evaluated again, while its protocols, seeds, grid, schedule (WiSE-FT α
    included) and P1 lengths stay the same (any change evaluates it afresh)."""
    key = {"protocols": list(protocols), "seeds": list(seeds), "grid": [g.name for g in grid],
           "schedule": json.loads(json.dumps(asdict(schedule))),
           "p1_epochs": {str(s): p1_epochs.get(unit, {}).get(str(s), {}).get("chosen") for s in seeds}}
    path = os.path.join(out, "records", f"{unit}.json")
    kept = read_json(path, None)
    if kept is not None and kept.get("key") == key:
        if progress is not None:
            progress.update(evaluations_per_unit(protocols, seeds, grid, schedule))
        return kept["records"]
    records = evaluate_unit(out, info, unit, protocols, seeds, grid, schedule, p1_epochs, seconds, progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, {"key": key, "records": records})
    return records


def evaluations_per_unit(protocols, seeds, grid, schedule: Schedule) -> int:
    """Models ``evaluate_unit`` evaluates (its progress units)."""
    starft = any(g.lam for g in grid)
    return len(protocols) * (1 + len(seeds) * (len(grid) + len(schedule.wise_alphas) *
                                               (1 + (starft and schedule.wise_of_selected))))
