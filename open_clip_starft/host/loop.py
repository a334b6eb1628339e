"""The epoch loop used when OpenCLIP lacks patches/0003: a generic loop around a train step.

It is patches/0003's ``train_one_epoch_with_step`` (the loop that patch adds to
``open_clip_train.train``), for open_clip_train 3.3.0 as released: the scheduler, zero_grad, the
step (``host/step.py``: batch → named losses), backward (upstream's, with the AMP scaler),
gradient clipping and the optimizer step, the logit-scale clamp, the step's ``after_step``, logging
to the log, tensorboard and wandb, and the step's ``end_epoch``. Nothing StarFT-specific is here,
so the StarFT logic exists once, in the step, whichever loop calls it.
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


def optimizer_step(model, optimizer, scaler, args) -> None:
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


def log_progress(losses, losses_m, logit_scale, batch_count, num_batches_per_epoch, samples_per_epoch, sample_digits,
                 batch_time_m, data_time_m, epoch, step, optimizer, args, tb_writer, extra) -> None:
    """One step's losses, speed, learning rate and the step's ``extra`` scalars to the log,
    tensorboard and wandb (as patches/0003's ``log_train_progress``); resets the time meters."""
    batch_size = args.batch_size
    num_samples = batch_count * batch_size * args.world_size
    percent_complete = 100.0 * batch_count / num_batches_per_epoch
    for key, val in losses.items():
        losses_m.setdefault(key, AverageMeter()).update(val.item(), batch_size)
    logit_scale_scalar = logit_scale.item()
    loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})" for name, m in losses_m.items())
    extra_log = "".join(f"{name.replace('_', ' ').capitalize()}: {val:.6g} " for name, val in extra.items())
    samples_per_second = args.batch_size * args.world_size / batch_time_m.val
    samples_per_second_per_gpu = args.batch_size / batch_time_m.val
    logging.info(
        f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{samples_per_epoch} ({percent_complete:.0f}%)] "
        f"Data (t): {data_time_m.avg:.3f} "
        f"Batch (t): {batch_time_m.avg:.3f}, {samples_per_second:#g}/s, {samples_per_second_per_gpu:#g}/s/gpu "
        f"LR: {optimizer.param_groups[0]['lr']:5f} "
        f"Logit Scale: {logit_scale_scalar:.3f} " + extra_log + loss_log
    )
    log_data = {
        "data_time": data_time_m.val,
        "batch_time": batch_time_m.val,
        "samples_per_second": samples_per_second,
        "samples_per_second_per_gpu": samples_per_second_per_gpu,
        "scale": logit_scale_scalar,
        "lr": optimizer.param_groups[0]["lr"],
        **extra,
    }
    log_data.update({name: m.val for name, m in losses_m.items()})
    log_data = {"train/" + name: val for name, val in log_data.items()}
    if tb_writer is not None:
        for name, val in log_data.items():
            tb_writer.add_scalar(name, val, step)
    if args.wandb:
        assert wandb is not None, "Please install wandb."
        log_data["step"] = step
        wandb.log(log_data, step=step)
    batch_time_m.reset()
    data_time_m.reset()


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, train_step, args, tb_writer=None) -> None:
    """One epoch in which ``train_step`` (``start_epoch``, ``__call__``, ``after_step``, ``end_epoch``)
    turns each batch, as the dataloader gives it, into named losses."""
    model.train()
    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    num_batches_per_epoch = dataloader.num_batches
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))
    first_batch = train_step.start_epoch(epoch, data, args) or 0

    losses_m = {}
    batch_time_m = AverageMeter()
    data_time_m = AverageMeter()
    end = time.time()
    batch_count = first_batch
    for i, batch in enumerate(dataloader, start=first_batch):
        if i >= num_batches_per_epoch:  # resumed mid-epoch: fewer batches are left in this epoch
            break
        step = num_batches_per_epoch * epoch + i
        if not args.skip_scheduler:
            scheduler(step)
        data_time_m.update(time.time() - end)
        optimizer.zero_grad()
        losses, logit_scale, extra = train_step(
            model, batch, loss, args, step=step, epoch=epoch, num_batches_per_epoch=num_batches_per_epoch)
        total_loss = sum(losses.values())
        losses["loss"] = total_loss
        backward(total_loss, scaler)
        optimizer_step(model, optimizer, scaler, args)
        with torch.no_grad():  # as upstream: clamp to ln(100)
            unwrap_model(model).logit_scale.clamp_(0, math.log(100))

        batch_count = i + 1
        train_step.after_step(model, optimizer, scaler, epoch, batch_count, args)
        batch_time_m.update(time.time() - end)
        end = time.time()
        if is_master(args) and (i % args.log_every_n_steps == 0 or batch_count == num_batches_per_epoch):
            log_progress(losses, losses_m, logit_scale, batch_count, num_batches_per_epoch, dataloader.num_samples,
                         sample_digits, batch_time_m, data_time_m, epoch, step, optimizer, args, tb_writer, extra)
    train_step.end_epoch(epoch, batch_count, args)
