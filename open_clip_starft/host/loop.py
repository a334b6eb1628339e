"""The epoch loop around a train step: the one source of the loop that patches/0003 adds to OpenCLIP.

``train_one_epoch_with_step`` and its two helpers, ``log_train_progress`` and ``optimizer_step``, are
the functions patches/0003-plugin-hook-losses-and-train-steps.patch adds to ``open_clip_train/train.py``,
character for character (``tests/test_patches.py`` fails when they differ; after changing a function
here, rewrite its lines in the patch from ``inspect.getsource``). Without the patch the hooks run the
loop from here; with it OpenCLIP runs its copy. Either way: the scheduler, zero_grad, the step
(``host/step.py``: batch → named losses), backward (upstream's, with the AMP scaler), gradient
clipping and the optimizer step, the logit-scale clamp, logging to the log, tensorboard and wandb,
then the step's ``after_step`` (after the step's log line, so a step that ends the run is logged),
and the step's ``end_epoch``. Nothing StarFT-specific is here, so the StarFT logic exists once, in
the step, whichever loop calls it. Names below are upstream's (``open_clip_train.train``'s).
"""
from __future__ import annotations

import logging
import math
import time

import torch
from open_clip_train.distributed import is_master
from open_clip_train.train import AverageMeter, backward, unwrap_model

try:
    import wandb
except ImportError:
    wandb = None

# the functions patches/0003 adds to open_clip_train/train.py, in the patch's order
PATCHED_FUNCTIONS = ("log_train_progress", "optimizer_step", "train_one_epoch_with_step")


def log_train_progress(losses, losses_m, logit_scale, batch_size, batch_count, num_batches_per_epoch, samples_per_epoch,
                       sample_digits, batch_time_m, data_time_m, epoch, step, optimizer, args, tb_writer, extra=None):
    """Log one step's losses, speed and learning rate to the log, tensorboard and wandb; reset the time meters."""
    num_samples = batch_count * batch_size * args.accum_freq * args.world_size
    percent_complete = 100.0 * batch_count / num_batches_per_epoch

    # NOTE loss is coarsely sampled, just master node and per log update
    for key, val in losses.items():
        if key not in losses_m:
            losses_m[key] = AverageMeter()
        losses_m[key].update(val.item(), batch_size)

    logit_scale_scalar = logit_scale.item()
    loss_log = " ".join(
        [
            f"{loss_name.capitalize()}: {loss_m.val:#.5g} ({loss_m.avg:#.5g})"
            for loss_name, loss_m in losses_m.items()
        ]
    )
    extra = extra or {}
    extra_log = "".join(f"{name.replace('_', ' ').capitalize()}: {val:.6g} " for name, val in extra.items())
    samples_per_second = args.accum_freq * args.batch_size * args.world_size / batch_time_m.val
    samples_per_second_per_gpu = args.accum_freq * args.batch_size / batch_time_m.val
    logging.info(
        f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{samples_per_epoch} ({percent_complete:.0f}%)] "
        f"Data (t): {data_time_m.avg:.3f} "
        f"Batch (t): {batch_time_m.avg:.3f}, {samples_per_second:#g}/s, {samples_per_second_per_gpu:#g}/s/gpu "
        f"LR: {optimizer.param_groups[0]['lr']:5f} "
        f"Logit Scale: {logit_scale_scalar:.3f} " + extra_log + loss_log
    )

    # Save train loss / etc. Using non avg meter values as loggers have their own smoothing
    log_data = {
        "data_time": data_time_m.val,
        "batch_time": batch_time_m.val,
        "samples_per_second": samples_per_second,
        "samples_per_second_per_gpu": samples_per_second_per_gpu,
        "scale": logit_scale_scalar,
        "lr": optimizer.param_groups[0]["lr"]
    }
    log_data.update(extra)
    log_data.update({name:val.val for name,val in losses_m.items()})

    log_data = {"train/" + name: val for name, val in log_data.items()}

    if tb_writer is not None:
        for name, val in log_data.items():
            tb_writer.add_scalar(name, val, step)

    if args.wandb:
        assert wandb is not None, 'Please install wandb.'
        log_data['step'] = step  # for backwards compatibility
        wandb.log(log_data, step=step)

    # resetting batch / data time meters per log window
    batch_time_m.reset()
    data_time_m.reset()


def optimizer_step(model, optimizer, scaler, args):
    """Unscale and clip the gradients if asked, then step the optimizer (through the AMP scaler if any)."""
    if scaler is not None:
        if args.horovod:
            optimizer.synchronize()
            scaler.unscale_(optimizer)
            if args.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            with optimizer.skip_synchronize():
                scaler.step(optimizer)
        else:
            if args.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            scaler.step(optimizer)
        scaler.update()
    else:
        if args.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
        optimizer.step()


def train_one_epoch_with_step(model, data, loss, epoch, optimizer, scaler, scheduler, train_step, args, tb_writer=None):
    """One epoch in which a plugin's ``train_step`` (see ``open_clip_train.plugins``) turns each batch into losses.

    With ``--accum-freq`` K > 1 each optimizer step takes K consecutive batches (micro-batches; a last
    incomplete group is dropped, as upstream's loop drops it) and ``train_step.accumulate`` yields their
    losses one micro-batch at a time; each is backpropagated before the next micro-batch's forward."""
    model.train()
    data['train'].set_epoch(epoch)  # set epoch in process safe manner via sampler or shared_epoch
    dataloader = data['train'].dataloader
    num_batches_per_epoch = dataloader.num_batches // args.accum_freq
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))
    start_epoch = getattr(train_step, "start_epoch", None)
    first_batch = (start_epoch(epoch, data, args) or 0) if start_epoch else 0
    after_step = getattr(train_step, "after_step", None)
    batches = dataloader if args.accum_freq == 1 else zip(*[iter(dataloader)] * args.accum_freq)

    losses_m = {}
    batch_time_m = AverageMeter()
    data_time_m = AverageMeter()
    end = time.time()
    batch_count = first_batch
    for i, batch in enumerate(batches, start=first_batch):
        if i >= num_batches_per_epoch:  # resumed mid-epoch: fewer batches are left in this epoch
            break
        step = num_batches_per_epoch * epoch + i
        if not args.skip_scheduler:
            scheduler(step)

        data_time_m.update(time.time() - end)
        optimizer.zero_grad()
        if args.accum_freq == 1:
            micro_steps = [train_step(
                model, batch, loss, args, step=step, epoch=epoch, num_batches_per_epoch=num_batches_per_epoch)]
        else:
            micro_steps = train_step.accumulate(
                model, batch, loss, args, step=step, epoch=epoch, num_batches_per_epoch=num_batches_per_epoch)
        for losses, logit_scale, extra in micro_steps:
            total_loss = sum(losses.values())
            losses["loss"] = total_loss
            backward(total_loss, scaler)
        optimizer_step(model, optimizer, scaler, args)

        # Note: we clamp to 4.6052 = ln(100), as in the original paper.
        with torch.no_grad():
            unwrap_model(model).logit_scale.clamp_(0, math.log(100))

        batch_count = i + 1
        batch_time_m.update(time.time() - end)
        end = time.time()
        if is_master(args) and (i % args.log_every_n_steps == 0 or batch_count == num_batches_per_epoch):
            log_train_progress(losses, losses_m, logit_scale, args.batch_size, batch_count, num_batches_per_epoch,
                               dataloader.num_samples, sample_digits, batch_time_m, data_time_m,
                               epoch, step, optimizer, args, tb_writer, extra=extra)
        # after this step's log line: after_step may save a checkpoint and stop the run
        if after_step is not None:
            after_step(model, optimizer, scaler, epoch, batch_count, args)
    # end for
    if hasattr(train_step, "end_epoch"):
        train_step.end_epoch(epoch, batch_count, args)
