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

import torch
import torch.distributed as dist
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
from open_clip_starft.method.schedule import star_lambda


def starft_losses(model, teacher: Teacher | None, loss, batch: Batch, lam: float, autocast, trim: bool = False):
    """One forward of the StarFT objective: ``(losses, logit_scale, star_term)``.

    ``batch``: a ``Batch`` on the model's device. ``losses = {"contrastive_loss", "star_loss"}``
    where ``star_loss`` is λ·L_star (0-dim tensors, summed for backward); ``star_term`` is L_star
    unweighted (0-dim, detached), None when ``lam == 0``: then this is the FLYP step (no spurious
    captions, no teacher). ``trim``: cut the token batches to their longest caption (exact for
    models set up by ``text_prefix.install_prefix_encoding``).
    """
    if trim:
        texts, spurious = trim_tokens(batch.texts, batch.spurious)
        batch = batch._replace(texts=texts, spurious=spurious)
    size = batch.images.shape[0]
    # The teacher first: its transient activations are freed before the student's, which are
    # kept for backward, exist; so StarFT's peak memory over FLYP is little more than the teacher.
    features = teacher.features(batch, autocast) if lam else None
    with autocast():
        if lam:
            out = model(batch.images, torch.cat([batch.texts, batch.spurious]))
            text_features, spurious_features = out["text_features"][:size], out["text_features"][size:]
        else:
            out = model(batch.images, batch.texts)
            text_features, spurious_features = out["text_features"], None
        losses = loss(out["image_features"], text_features, out["logit_scale"],
                      spurious_features=spurious_features, labels=batch.labels, star_lambda=lam,
                      teacher_image_features=features.image if lam else None,
                      teacher_spurious_features=features.spurious if lam else None,
                      teacher_logit_scale=features.scale if lam else None,
                      logit_bias=out.get("logit_bias"), output_dict=True)
    star_term = losses["star_loss"].detach() / lam if lam else None
    return losses, out["logit_scale"], star_term


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_rows(values: torch.Tensor) -> list[list[float]]:
    """``values [K]`` of every process (one all-gather under torch.distributed), as Python floats."""
    if not _distributed():
        return [values.tolist()]
    rows = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, values)
    return torch.stack(rows).tolist()


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
        self.num_batches = self.train.dataloader.num_batches
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
            self.train.start_from(epoch, self.start_batch)  # the data continues the same sample order
        if self.state.validation is not None:  # a new run: the zero-shot model's scores first (epoch 0)
            self.state.validation.start(epoch, self.start_batch, args)
        return self.start_batch

    def __call__(self, model, batch, loss, args, *, step: int, epoch: int, num_batches_per_epoch: int):
        """``(losses {"contrastive_loss", "star_loss" = λ·L_star}, logit_scale, log {"star_lambda",
        "step", "star_term" = L_star when λ > 0})`` for one batch (as the dataloader gave it)."""
        self.loop_model = model
        if self.frozen_batchnorm is not None:
            self.frozen_batchnorm.hold()  # after the loop's model.train() and any mid-epoch evaluation
        batch = Batch.of(batch)
        lam = star_lambda(args.starft_schedule, args.starft_lambda, step, num_batches_per_epoch, args.epochs)
        teacher = self.teacher if lam else None
        data_error = self._label_error(args)
        if teacher is not None:
            batch = batch._replace(keys=teacher.cache_keys(batch.spurious))
        batch = batch.to(self.device, self.input_dtype)
        losses, logit_scale, star_term = starft_losses(model, teacher, loss, batch, lam, self.autocast,
                                                       trim=has_prefix_encoding(model))
        terms = {**losses, **({"star_term": star_term} if star_term is not None else {})}
        # One all-gather per step: every process's data error and signal flags and loss values, so
        # all processes stop, or save and stop, at the same step (none is left waiting in a collective).
        flags = torch.tensor([data_error is not None, FLAG.pending], dtype=torch.float32, device=self.device)
        rows = _gather_rows(torch.cat([flags, torch.stack([v.detach().float() for v in terms.values()])]))
        own = rows[dist.get_rank() if _distributed() else 0][2:]
        self.last_terms = ", ".join(f"{name}={value:.6g}" for name, value in zip(terms, own))
        self._check_rows(rows, list(terms), data_error, step=step, epoch=epoch,
                         batches_done=step - epoch * num_batches_per_epoch, lam=lam, args=args)
        self.preempt = any(row[1] for row in rows)
        log = {"star_lambda": lam, "step": step}
        if star_term is not None:
            log["star_term"] = own[list(terms).index("star_term")]
        return losses, logit_scale, log

    def _check_rows(self, rows, names, data_error, *, step, epoch, batches_done, lam, args) -> None:
        """Stop every process at this step when any found a data error (``_stop_late``) or a non-finite loss
        term; ``rows``: every process's [data error, signal, loss terms ``names``...] (one all-gather)."""
        if any(row[0] for row in rows):
            self._stop_late(data_error, epoch, batches_done, args)
        bad = [(rank, row) for rank, row in enumerate(rows) if not all(math.isfinite(v) for v in row[2:])]
        if bad:
            rank, row = bad[0]
            values = ", ".join(f"{name}={value:.6g}" for name, value in zip(names, row[2:]))
            where = f" on rank {rank}" if len(rows) > 1 else ""
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
        if any(row[0] for row in _gather_rows(flag)):
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
