"""StarFT as an OpenCLIP plugin: the loss and train step that patches/0003 lets open_clip_train load by name.

With ``patches/0003-plugin-hook-losses-and-train-steps.patch`` applied, open_clip_train finds
these through the entry points this package declares (``pyproject.toml``)::

    open_clip_train.losses       starft = open_clip_starft.host.plugin:create_loss
    open_clip_train.train_steps  starft = open_clip_starft.host.plugin:StarftStep

and ``open_clip_starft.main`` passes ``--loss starft --train-step starft`` instead of rebinding
``create_loss`` and ``train_one_epoch`` (``hooks.py`` still adds the StarFT flags, the labelled
data, the teacher and the checkpoint extras). Without the patch the runtime hooks do it all.
"""
from __future__ import annotations

import importlib.util
import logging
from importlib.metadata import entry_points

import torch
from open_clip_train.distributed import is_master

from open_clip_starft.errors import StarftError
from open_clip_starft.method.loss import StarLoss
from open_clip_starft.host.preemption import FLAG, Preempted
from open_clip_starft.host.teacher import fingerprint
from open_clip_starft.host.step import batch_losses, finish_epoch

NAME = "starft"
LOSS_GROUP = "open_clip_train.losses"
STEP_GROUP = "open_clip_train.train_steps"

# The StarftHooks of the run in progress (set while its ``with`` block runs): the train step the
# host builds by name reaches the run's teacher, caches and checkpoint writer through it.
ACTIVE = None


def host_has_plugin_hook() -> bool:
    """True when the installed open_clip_train carries patches/0003 and sees this package's entry points."""
    if importlib.util.find_spec("open_clip_train.plugins") is None:
        return False
    return all(any(ep.name == NAME for ep in entry_points(group=group)) for group in (LOSS_GROUP, STEP_GROUP))


def create_loss(args) -> StarLoss:
    """``StarLoss`` from OpenCLIP's loss flags and ``--starft-no-mask`` (``open_clip_train.losses`` entry point)."""
    if args.world_size > 1 and args.starft_lambda > 0 and not args.gather_with_grad:
        logging.warning("StarFT under DDP without --gather-with-grad: the Star term's columns from other processes "
                        "carry no gradient (as ClipLoss's); pass --gather-with-grad for the exact global-batch gradient")
    return StarLoss(
        mask_same_class=not args.starft_no_mask,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )


class StarftStep:
    """StarFT's train step for open_clip_train's plugin loop (``open_clip_train.train_steps`` entry point).

    Built by the host from ``(args, model)`` right after model creation; the teacher and caches
    come from the run's ``StarftHooks``. Per batch it returns ``(losses, logit_scale, log)`` with
    ``losses = {"contrastive_loss", "star_loss"}`` and ``log = {"star_lambda", "step"}``.
    """

    def __init__(self, args, model):
        if ACTIVE is None:
            raise StarftError(f"--train-step {NAME} needs StarFT's flags, labelled data and teacher: "
                              "run `python -m open_clip_starft.main` (or `open-clip-starft train`), "
                              "not open_clip_train.main")
        self.hooks = ACTIVE
        self.model = model  # the student as created (DDP wraps this module; its parameters are the same)
        self.label_stats = None
        self.start_batch = 0
        self.num_batches_per_epoch = 0

    def start_epoch(self, epoch: int, data: dict, args) -> int:
        """Batches of ``epoch`` already done (a resumed preemption checkpoint), else 0."""
        self.label_stats = data["train"].label_stats
        self.num_batches_per_epoch = data["train"].dataloader.num_batches
        if self.hooks.teacher is not None and is_master(args):
            logging.info(f"StarFT teacher fingerprint at epoch {epoch}: {fingerprint(self.hooks.teacher):.10g}")
        self.start_batch = self.hooks.first_batch(epoch)
        return self.start_batch

    def __call__(self, model, batch, loss, args, *, step: int, epoch: int, num_batches_per_epoch: int):
        losses, logit_scale, lam = batch_losses(model, self.hooks.teacher, loss, batch, args, step,
                                                num_batches_per_epoch, self.label_stats,
                                                text_cache=self.hooks.text_cache, image_cache=self.hooks.image_cache)
        return losses, logit_scale, {"star_lambda": lam, "step": step}

    def after_step(self, model, optimizer, scaler, epoch: int, batches_done: int, args) -> None:
        """On SIGUSR1/SIGTERM (any process): save a mid-epoch checkpoint and stop (``Preempted``)."""
        if FLAG.requested(args.distributed, torch.device(args.device)):
            raise Preempted(self.hooks.save_preemption_checkpoint(model, optimizer, scaler, epoch, batches_done, args))

    def end_epoch(self, epoch: int, batches_done: int, args) -> None:
        finish_epoch(epoch, batches_done, self.start_batch, self.num_batches_per_epoch, self.label_stats, args,
                     self.hooks.text_cache)
        logging.info(f"StarFT rank {args.rank}: model fingerprint after epoch {epoch}: {fingerprint(self.model):.10g}")
