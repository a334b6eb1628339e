"""The StarFT train step: everything StarFT adds to a training run, in one object.

``StarftStep(args, model)`` is built right after model creation (before lock, grad
checkpointing, DDP, compile and resume): by OpenCLIP itself through the entry point
``open_clip_train.train_steps: starft`` when patches/0003 is installed, else by the hooks'
``create_model_and_transforms``. Either epoch loop (patches/0003's ``train_one_epoch_with_step``
or ``host/loop.py``, the same protocol) calls it::

    first = step.start_epoch(epoch, data, args)             # batches already done (a resumed run)
    losses, logit_scale, log = step(model, batch, loss, args, step=s, epoch=e, num_batches_per_epoch=n)
    step.after_step(model, optimizer, scaler, epoch, batches_done, args)
    step.end_epoch(epoch, batches_done, args)

It owns the frozen teacher and its caches (``Teacher``), the λ schedule (the one call of
``star_lambda``), the label checks, the non-finite-loss stop, preemption and the per-epoch
checks and logs. What it needs from the hooks comes by construction, in the hooks' ``RunState``
(``state.py``: the class count, what ``--resume`` loaded, the settings history it saves with each
checkpoint); ``args`` carries the flags (``args.starft_*``, added by the hooks' ``parse_args``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from open_clip import get_input_dtype
from open_clip_train.distributed import is_master
from open_clip_train.file_utils import pt_load
from open_clip_train.precision import get_autocast

from open_clip_starft.errors import ConfigError, NumericError, StarftError
from open_clip_starft.host.batch import Batch
from open_clip_starft.host.batchnorm import FrozenBatchNormStats
from open_clip_starft.host.checkpoint import save_best, save_mid_epoch, weights_are_finite
from open_clip_starft.host.preemption import FLAG, Preempted
from open_clip_starft.host.state import RunState
from open_clip_starft.host.teacher import Teacher, fingerprint
from open_clip_starft.host.text_prefix import has_prefix_encoding, trim_tokens
from open_clip_starft.method.distributed import all_gather_cat, rank_and_world
from open_clip_starft.method.schedule import star_lambda


def _student_features(model, batch: Batch, with_star: bool) -> tuple[dict, dict]:
    """The student's forward on ``batch``: ``({"image", "text"[, "spurious"]} features [B, D], model output)``.
    With the Star term the clean and the spurious captions go through the text tower as one batch."""
    if not with_star:
        out = model(batch.images, batch.texts)
        return {"image": out["image_features"], "text": out["text_features"]}, out
    size = batch.images.shape[0]
    out = model(batch.images, torch.cat([batch.texts, batch.spurious]))
    return {"image": out["image_features"], "text": out["text_features"][:size],
            "spurious": out["text_features"][size:]}, out


def _value_without_gradient(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``'s value, passing a zero gradient (so DDP still sees every parameter take part)."""
    return None if t is None else t.detach() + 0 * t


def accumulated_losses(model, teacher: Teacher | None, loss, batches: list[Batch], lam: float, autocast,
                       trim: bool = False):
    """The StarFT objective of one accumulated batch, micro-batch by micro-batch (OpenCLIP's ``--accum-freq``).

    Yields, for each micro-batch ``j`` of ``batches`` (``Batch``es on the model's device), ``(losses,
    logit_scale, star_term)``: ``losses = {"contrastive_loss", "star_loss" = λ·L_star}`` (0-dim) are the terms
    of the WHOLE accumulated batch, with gradient only through micro-batch ``j``'s features (and through the
    model's logit scale and bias only at ``j == 0``), so that calling backward on each in turn sums to the
    gradient of the whole batch; ``star_term`` is ``L_star`` unweighted (0-dim, detached), None for FLYP.
    As upstream's ``train_one_epoch``: every micro-batch's features first without gradient, then each
    micro-batch again with gradient against the others' cached features. The teacher's features are
    computed once per accumulated batch. ``teacher``: None for the FLYP step (λ = 0: no spurious captions,
    no teacher). ``trim``: cut each micro-batch's tokens to its longest caption (exact for models set up
    by ``text_prefix.install_prefix_encoding``). One micro-batch: the plain step, no cached pass.
    """
    with_star = teacher is not None
    if trim:
        batches = [b._replace(**dict(zip(("texts", "spurious"), trim_tokens(b.texts, b.spurious)))) for b in batches]
    star_inputs = {}
    if with_star:
        # The teacher first: its transient activations are freed before the student's, which are
        # kept for backward, exist; so StarFT's peak memory over FLYP is little more than the teacher.
        parts = [teacher.features(b, autocast) for b in batches]
        star_inputs = dict(teacher_image_features=torch.cat([p.image for p in parts]),
                           teacher_spurious_features=torch.cat([p.spurious for p in parts]),
                           teacher_logit_scale=parts[0].scale, teacher_logit_bias=parts[0].bias,
                           class_ids=torch.cat([b.labels for b in batches]))
    cached = None
    if len(batches) > 1:
        with torch.no_grad(), autocast():
            cached = [_student_features(model, b, with_star)[0] for b in batches]
    for j, micro in enumerate(batches):
        with autocast():
            features, out = _student_features(model, micro, with_star)
            scale, bias = out["logit_scale"], out.get("logit_bias")
            if cached is not None:
                features = {k: torch.cat([c[k] for c in cached[:j]] + [v] + [c[k] for c in cached[j + 1:]])
                            for k, v in features.items()}
                if j > 0:
                    scale, bias = _value_without_gradient(scale), _value_without_gradient(bias)
            terms = loss(features["image"], features["text"], scale, bias,
                         spurious_features=features.get("spurious"), output_dict=True, **star_inputs)
        star_term = terms.get("star_loss")
        losses = {"contrastive_loss": terms["contrastive_loss"],
                  "star_loss": lam * star_term if with_star else torch.zeros((), device=scale.device)}
        yield losses, out["logit_scale"], star_term.detach() if with_star else None


def starft_losses(model, teacher: Teacher | None, loss, batch: Batch, lam: float, autocast, trim: bool = False):
    """One forward of the StarFT objective on one batch: ``(losses, logit_scale, star_term)`` as
    ``accumulated_losses`` yields them for a single micro-batch."""
    return next(accumulated_losses(model, teacher, loss, [batch], lam, autocast, trim))


@dataclass
class StepReport:
    """What one process reports of a step to the others, in the step's one all-gather: whether its data
    check failed, whether it received a stop signal, and its loss terms (name → 0-dim tensor before the
    gather, float after). ``to_tensor``/``from_tensor``: the float row ``[data_error, stop_signal, *terms]``
    that travels."""
    data_error: bool
    stop_signal: bool
    terms: dict

    def to_tensor(self, device) -> torch.Tensor:
        flags = torch.tensor([self.data_error, self.stop_signal], dtype=torch.float32, device=device)
        values = [torch.as_tensor(v, device=device).detach().float().reshape(1) for v in self.terms.values()]
        return torch.cat([flags, *values])

    @classmethod
    def from_tensor(cls, row, names) -> "StepReport":
        values = row.tolist()
        return cls(bool(values[0]), bool(values[1]), dict(zip(names, values[2:])))

    @classmethod
    def gather(cls, report: "StepReport", device) -> list["StepReport"]:
        """Every process's report, in rank order (one all-gather under torch.distributed)."""
        rows = all_gather_cat(report.to_tensor(device)[None])
        return [cls.from_tensor(row, list(report.terms)) for row in rows]


class StarftStep:
    """StarFT's train step (see the module docstring); one per run, built from ``(args, model, state)``
    (``state``: the hooks' ``RunState``; the entry point OpenCLIP loads is built by the hooks with it)."""

    def __init__(self, args, model, state: RunState | None = None):
        if state is None or not hasattr(args, "starft_lambda"):
            raise ConfigError("--train-step starft needs StarFT's flags, labelled data and teacher: "
                              "run `python -m open_clip_starft.main` (or `open-clip-starft train`), "
                              "not open_clip_train.main")
        self.state = state
        self.model = model  # the student as created (DDP wraps this module; its parameters are the same)
        self.teacher = None
        if args.starft_lambda > 0:
            self.teacher = Teacher(
                model, image_cache=args.starft_teacher_image_cache, batchnorm=args.starft_teacher_batchnorm,
                text_cache_mb=args.starft_teacher_text_cache_mb if args.starft_suffix != "random" else 0)
            logging.info(f"StarFT teacher: a frozen copy of the initial model (fingerprint Σ|θ| = "
                         f"{self.teacher.fingerprint():.10g})")
        self.frozen_batchnorm = FrozenBatchNormStats(model) if args.starft_freeze_bn_stats else None
        if self.frozen_batchnorm is not None:
            logging.info(f"StarFT: {len(self.frozen_batchnorm.layers)} BatchNorm layers keep the zero-shot model's "
                         "running statistics (--starft-freeze-bn-stats)")
            if not self.frozen_batchnorm.layers:
                logging.warning("--starft-freeze-bn-stats: the model has no BatchNorm layer; the flag changes nothing")
        self.device = torch.device(args.device)
        self.autocast = get_autocast(args.precision, device_type=self.device.type)
        self.input_dtype = get_input_dtype(args.precision)
        self.source = repr(args.train_data)
        self.train = None          # this epoch's training DataInfo (start_epoch)
        self.start_batch = 0       # batches of this epoch done before this process started it
        self.num_batches = 0
        self.loop_model = model    # the model the loop trains (DDP/compiled), for checkpoints
        self.optimizer = self.scaler = None  # the run's, seen by after_step: a late stop saves with them
        self.preempt = False       # agreed in __call__, acted on in after_step
        self.last_terms = ""       # this process's loss terms of the last step, for the preemption log line
        self.teacher_resumed = False

    # -- the protocol ---------------------------------------------------------------------------
    def start_epoch(self, epoch: int, data: dict, args) -> int:
        """Batches of ``epoch`` already done (a resumed preemption checkpoint), else 0."""
        self.train = data["train"]
        self.num_batches = self.train.dataloader.num_batches // args.accum_freq  # optimizer steps, as upstream counts
        self.state.note_step(epoch, self.num_batches)
        resumed = self.state.resumed
        if resumed is not None and resumed.bare and self.teacher is not None and not self.teacher_resumed:
            # upstream loads a bare (model-only) --resume file as the starting weights: the teacher too
            self.teacher.load_weights(pt_load(resumed.path, map_location="cpu"))
            logging.info(f"StarFT teacher: loaded the bare --resume weights {resumed.path} as the zero-shot model "
                         f"(fingerprint Σ|θ| = {self.teacher.fingerprint():.10g})")
        self.teacher_resumed = True
        if self.teacher is not None and is_master(args):
            logging.info(f"StarFT teacher fingerprint at epoch {epoch}: {self.teacher.fingerprint():.10g}")
        self.start_batch = resumed.batches_done if resumed is not None and resumed.epoch == epoch else 0
        if self.start_batch:
            logging.info(f"StarFT: resuming epoch {epoch} after batch {self.start_batch} (preemption checkpoint)")
            # the data continues the same sample order (the dataloader counts micro-batches)
            self.train.start_from(epoch, self.start_batch * args.accum_freq)
        if self.state.validation is not None:  # a new run: the zero-shot model's scores first (epoch 0)
            self.state.validation.start(epoch, self.start_batch, args)
        return self.start_batch

    def __call__(self, model, batch, loss, args, *, step: int, epoch: int, num_batches_per_epoch: int):
        """``(losses {"contrastive_loss", "star_loss" = λ·L_star}, logit_scale, log {"star_lambda",
        "step", "star_term" = L_star when λ > 0})`` for one batch (as the dataloader gave it)."""
        return next(self.accumulate(model, [batch], loss, args, step=step, epoch=epoch,
                                    num_batches_per_epoch=num_batches_per_epoch))

    def accumulate(self, model, batches, loss, args, *, step: int, epoch: int, num_batches_per_epoch: int):
        """``--accum-freq``: yields ``__call__``'s triple for each micro-batch of ``batches`` (as the dataloader
        gave them), the losses being the whole accumulated batch's with gradient through that micro-batch
        only (``accumulated_losses``): the loop calls backward on each in turn, then steps the optimizer once."""
        self.loop_model = model
        if self.frozen_batchnorm is not None:
            self.frozen_batchnorm.hold()  # after the loop's model.train() and any mid-epoch evaluation
        batches = [Batch.of(b) for b in batches]
        lam = star_lambda(args.starft_schedule, args.starft_lambda, step, num_batches_per_epoch, args.epochs)
        teacher = self.teacher if lam > 0 else None  # λ decides FLYP or StarFT, here only
        data_error = self._label_error(args)
        if teacher is not None:
            batches = [b._replace(keys=teacher.cache_keys(b.spurious)) for b in batches]
        batches = [b.to(self.device, self.input_dtype) for b in batches]
        micro_steps = accumulated_losses(model, teacher, loss, batches, lam, self.autocast,
                                         trim=has_prefix_encoding(model))
        losses, logit_scale, star_term = next(micro_steps)  # each micro-batch's terms are the whole batch's
        terms = {**losses, **({"star_term": star_term} if star_term is not None else {})}
        # One all-gather per step: every process's data error and signal flags and loss values, so
        # all processes stop, or save and stop, at the same step (none is left waiting in a collective).
        reports = StepReport.gather(StepReport(data_error is not None, FLAG.pending, terms), self.device)
        own = reports[rank_and_world()[0]].terms
        self.last_terms = ", ".join(f"{name}={value:.6g}" for name, value in own.items())
        self._check_reports(reports, data_error, step=step, epoch=epoch,
                            batches_done=step - epoch * num_batches_per_epoch, lam=lam, args=args)
        self.preempt = any(report.stop_signal for report in reports)
        log = {"star_lambda": lam, "step": step, **({"star_term": own["star_term"]} if star_term is not None else {})}
        yield losses, logit_scale, log
        for losses, logit_scale, _ in micro_steps:
            yield losses, logit_scale, log

    def _check_reports(self, reports: list[StepReport], data_error, *, step, epoch, batches_done, lam, args) -> None:
        """Stop every process at this step when any found a data error (``_stop_late``) or a non-finite loss
        term; ``reports``: every process's ``StepReport`` of this step (one all-gather)."""
        if any(report.data_error for report in reports):
            self._stop_late(data_error, epoch, batches_done, args)
        bad = [(rank, r) for rank, r in enumerate(reports) if not all(math.isfinite(v) for v in r.terms.values())]
        if bad:
            rank, report = bad[0]
            values = ", ".join(f"{name}={value:.6g}" for name, value in report.terms.items())
            where = f" on rank {rank}" if len(reports) > 1 else ""
            raise NumericError(
                f"non-finite loss at step {step} (epoch {epoch}, batch {batches_done}){where}: {values} (λ={lam:g}); "
                "the step was not taken and nothing was saved from it: lower --lr, check the data, or use "
                "--precision amp_bf16 or fp32 instead of amp, then continue with --resume latest")

    def after_step(self, model, optimizer, scaler, epoch: int, batches_done: int, args) -> None:
        """On SIGUSR1/SIGTERM (any process, agreed in ``__call__``): save a mid-epoch checkpoint and stop.
        Else, with ``--starft-val-steps``, the validation sets are scored when their step comes."""
        self.optimizer, self.scaler = optimizer, scaler
        if self.preempt:
            logging.info(f"StarFT: a stop signal came; epoch {epoch}, batch {batches_done}'s losses: {self.last_terms}")
            raise Preempted(save_mid_epoch(model, optimizer, scaler, epoch, batches_done, args, self.state))
        if self.state.validation is not None:
            self.state.validation.after_step(epoch * self.num_batches + batches_done, epoch, batches_done,
                                             self.num_batches, args)

    def end_epoch(self, epoch: int, batches_done: int, args) -> None:
        """End-of-epoch checks (too many skipped samples; no batch at all) and summaries."""
        error = None
        try:
            self.train.label_stats.check(args.starft_max_skipped_fraction, self.state.num_classes, self.source,
                                         final=True)
            if batches_done == self.start_batch < self.num_batches:
                raise StarftError(
                    f"--train-data {self.source} gave no training batch in epoch {epoch} "
                    f"({self.train.label_stats.summary()}): check that the shards hold images with a 'cls' label "
                    "and that --batch-size fits the data")
        except StarftError as e:
            error = e
        flag = torch.tensor([error is not None], dtype=torch.float32, device=self.device)
        if all_gather_cat(flag).any():
            self._stop_late(error, epoch, batches_done, args)
        if is_master(args):
            logging.info(f"StarFT data, epoch {epoch}: {self.train.label_stats.summary()}")
            if self.teacher is not None and self.teacher.text_cache is not None:
                logging.info(f"StarFT teacher text cache, epoch {epoch}: {self.teacher.text_cache.summary()}")
        logging.info(f"StarFT rank {args.rank}: model fingerprint after epoch {epoch}: {fingerprint(self.model):.10g}")
        if self.state.validation is not None:
            best = self.state.validation.end_epoch(epoch, (epoch + 1) * self.num_batches, args)
            if best is not None:
                save_best(self.loop_model, best, args, self.state)
                self.state.validation.best_saved(args)

    # -- stopping -----------------------------------------------------------------------------
    def _label_error(self, args) -> StarftError | None:
        """The label check's error so far in this process's data (too many skipped, id out of range)."""
        try:
            self.train.label_stats.check(args.starft_max_skipped_fraction, self.state.num_classes, self.source)
        except StarftError as e:
            return e
        return None

    def _stop_late(self, error: StarftError | None, epoch: int, batches_done: int, args):
        """Stop the run on a data error found by this or another process (all call this at the same
        step): first save ``epoch_E_step_K.pt`` when this epoch made progress and the weights are finite."""
        message = str(error) if error is not None else "another process stopped the run on its training data (see its error)"
        if batches_done > self.start_batch and self.optimizer is not None:
            if not weights_are_finite(self.loop_model):
                message += " (nothing saved: the weights are not finite)"
            elif args.logs and str(args.logs).lower() != "none":
                path = save_mid_epoch(self.loop_model, self.optimizer, self.scaler, epoch, batches_done, args,
                                      self.state)
                message += f" (saved {path} first: fix the data, then continue with --resume latest)"
        raise StarftError(message)
