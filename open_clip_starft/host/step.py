"""The training hook: OpenCLIP's epoch loop with StarFT's batch and step.

Upstream's ``train_one_epoch`` unpacks ``images, texts = batch``; ours carries
``(images, texts, spurious, labels)``, runs the student once on captions and spurious captions
together, the teacher under inference mode, and ``StarLoss`` with the scheduled λ. The rest
(scheduler, AMP scaler, clipping, logit-scale clamp, logging to text/tensorboard/wandb) follows
upstream's loop line for line.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from open_clip import get_input_dtype
from open_clip_train.distributed import is_master
from open_clip_train.precision import get_autocast
from open_clip_train.train import AverageMeter, backward, unwrap_model

from open_clip_starft.errors import StarftError
from open_clip_starft.host.preemption import FLAG, Preempted
from open_clip_starft.method.schedule import star_lambda
from open_clip_starft.host.teacher import TeacherImageCache, TeacherTextCache, teacher_features
from open_clip_starft.host.text_prefix import has_prefix_encoding, trim_tokens

try:
    import wandb
except ImportError:
    wandb = None


def starft_losses(model, teacher, loss, images, texts, spurious, labels, lam: float, autocast, trim: bool = False,
                  text_cache: TeacherTextCache | None = None, spurious_keys: list[bytes] | None = None,
                  image_cache: TeacherImageCache | None = None, plain_images=None, sample_ids=None):
    """One forward of the StarFT objective: ``({"contrastive_loss", "star_loss"}, logit_scale)``.

    ``images [B,3,H,W]``, ``texts``/``spurious [B,L]`` token ids, ``labels [B]``. With ``lam == 0``
    this is the FLYP step: no spurious captions, no teacher. ``trim``: cut the token batches to
    their longest caption (exact for models set up by ``text_prefix.install_prefix_encoding``).
    ``text_cache`` with ``spurious_keys`` (``TeacherTextCache.keys`` of ``spurious``): reuse the
    teacher's features of captions seen before. ``image_cache`` with ``plain_images`` and
    ``sample_ids``: the teacher's image features per image (an approximation, see TeacherImageCache).
    """
    batch = images.shape[0]
    if trim:
        texts, spurious = trim_tokens(texts, spurious)
    teacher_image = teacher_spurious = teacher_scale = None
    if lam:
        # The teacher first: its transient activations are freed before the student's, which are
        # kept for backward, exist; so StarFT's peak memory over FLYP is little more than the teacher.
        teacher_image, teacher_spurious, teacher_scale = teacher_features(
            teacher, images, spurious, autocast, text_cache=text_cache, spurious_keys=spurious_keys,
            image_cache=image_cache, plain_images=plain_images, sample_ids=sample_ids)
    with autocast():
        if lam:
            out = model(images, torch.cat([texts, spurious]))
            text_features, spurious_features = out["text_features"][:batch], out["text_features"][batch:]
        else:
            out = model(images, texts)
            text_features, spurious_features = out["text_features"], None
    with autocast():
        losses = loss(out["image_features"], text_features, out["logit_scale"],
                      spurious_features=spurious_features, teacher_image_features=teacher_image,
                      teacher_spurious_features=teacher_spurious, labels=labels,
                      teacher_logit_scale=teacher_scale, star_lambda=lam,
                      logit_bias=out.get("logit_bias"), output_dict=True)
    return losses, out["logit_scale"]


def batch_losses(model, teacher, loss, batch, args, step: int, num_batches_per_epoch: int, label_stats,
                 text_cache: TeacherTextCache | None = None, image_cache: TeacherImageCache | None = None):
    """One StarFT batch, as the data pipeline gives it, to ``(losses, logit_scale, λ)`` at global ``step``.

    ``batch``: ``(images [B,3,H,W], texts [B,L], spurious [B,L], labels [B])`` on the CPU, plus
    ``(plain_images, sample_ids)`` with the teacher image cache. This is the part of the epoch
    loop that differs from upstream's; OpenCLIP's plugin train step (patches/0003) calls it too.
    """
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    lam = star_lambda(args.starft_schedule, args.starft_lambda, step, num_batches_per_epoch, args.epochs)

    images, texts, spurious, labels, *plain = batch
    plain_images, sample_ids = (plain[0].to(device=device, dtype=input_dtype), plain[1]) if plain else (None, None)
    spurious_keys = text_cache.keys(spurious) if text_cache is not None and lam else None
    images = images.to(device=device, dtype=input_dtype, non_blocking=True)
    texts = texts.to(device=device, non_blocking=True)
    spurious = spurious.to(device=device, non_blocking=True)
    labels = labels.to(device=device, non_blocking=True)
    label_stats.check(args.starft_max_skipped_fraction, args.starft_num_classes, repr(args.train_data))

    losses, logit_scale = starft_losses(model, teacher, loss, images, texts, spurious, labels, lam, autocast,
                                        has_prefix_encoding(model), text_cache, spurious_keys, image_cache,
                                        plain_images, sample_ids)
    return losses, logit_scale, lam


def finish_epoch(epoch: int, batch_count: int, start_batch: int, num_batches_per_epoch: int, label_stats, args,
                 text_cache: TeacherTextCache | None = None) -> None:
    """End-of-epoch checks (too many skipped samples; no batch at all: one-line errors) and summaries."""
    source = repr(args.train_data)
    label_stats.check(args.starft_max_skipped_fraction, args.starft_num_classes, source, final=True)
    if batch_count == start_batch < num_batches_per_epoch:
        raise StarftError(f"--train-data {source} gave no training batch in epoch {epoch} ({label_stats.summary()}): "
                          "check that the shards hold images with a 'cls' label and that --batch-size fits the data")
    if is_master(args):
        logging.info(f"StarFT data, epoch {epoch}: {label_stats.summary()}")
        if text_cache is not None:
            logging.info(f"StarFT teacher text cache, epoch {epoch}: {text_cache.summary()}")


def train_one_epoch(model, teacher, data, loss, epoch, optimizer, scaler, scheduler, args, tb_writer=None,
                    text_cache: TeacherTextCache | None = None, start_batch: int = 0, on_preempt=None,
                    image_cache: TeacherImageCache | None = None):
    """One epoch of StarFT, from batch ``start_batch`` (a resumed preemption checkpoint) on.

    ``on_preempt(batches_done)``, when given, writes a mid-epoch checkpoint; it is called after
    the step during which SIGUSR1/SIGTERM arrived, and ``Preempted`` is raised after it.
    """
    device = torch.device(args.device)
    model.train()
    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    label_stats = data["train"].label_stats
    num_batches_per_epoch = dataloader.num_batches // args.accum_freq
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))

    losses_m = {}
    batch_time_m = AverageMeter()
    data_time_m = AverageMeter()
    end = time.time()
    batch_count = start_batch
    for i, batch in enumerate(dataloader, start=start_batch):
        if i >= num_batches_per_epoch:  # resumed mid-epoch: this epoch has fewer batches left
            break
        step = num_batches_per_epoch * epoch + i
        if not args.skip_scheduler:
            scheduler(step)
        data_time_m.update(time.time() - end)
        optimizer.zero_grad()
        losses, logit_scale, lam = batch_losses(model, teacher, loss, batch, args, step, num_batches_per_epoch,
                                                label_stats, text_cache=text_cache, image_cache=image_cache)
        total_loss = sum(losses.values())
        losses["loss"] = total_loss
        backward(total_loss, scaler)

        if scaler is not None:
            if args.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            if args.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            optimizer.step()

        # as upstream: clamp to ln(100)
        with torch.no_grad():
            unwrap_model(model).logit_scale.clamp_(0, math.log(100))

        if on_preempt is not None and FLAG.requested(args.distributed, device):
            raise Preempted(on_preempt(i + 1))

        batch_time_m.update(time.time() - end)
        end = time.time()
        batch_count = i + 1
        if is_master(args) and (i % args.log_every_n_steps == 0 or batch_count == num_batches_per_epoch):
            batch_size = len(batch[0])
            num_samples = batch_count * batch_size * args.world_size
            percent_complete = 100.0 * batch_count / num_batches_per_epoch
            for key, val in losses.items():
                losses_m.setdefault(key, AverageMeter()).update(val.item(), batch_size)
            logit_scale_scalar = logit_scale.item()
            loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})" for name, m in losses_m.items())
            samples_per_second = args.batch_size * args.world_size / batch_time_m.val
            samples_per_second_per_gpu = args.batch_size / batch_time_m.val
            logging.info(
                f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{dataloader.num_samples} ({percent_complete:.0f}%)] "
                f"Step: {step} "
                f"Data (t): {data_time_m.avg:.3f} "
                f"Batch (t): {batch_time_m.avg:.3f}, {samples_per_second:#g}/s, {samples_per_second_per_gpu:#g}/s/gpu "
                f"LR: {optimizer.param_groups[0]['lr']:5f} "
                f"Logit Scale: {logit_scale_scalar:.3f} "
                f"Star lambda: {lam:.6g} " + loss_log
            )
            log_data = {
                "data_time": data_time_m.val,
                "batch_time": batch_time_m.val,
                "samples_per_second": samples_per_second,
                "samples_per_second_per_gpu": samples_per_second_per_gpu,
                "scale": logit_scale_scalar,
                "lr": optimizer.param_groups[0]["lr"],
                "star_lambda": lam,
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

    finish_epoch(epoch, batch_count, start_batch, num_batches_per_epoch, label_stats, args, text_cache)
