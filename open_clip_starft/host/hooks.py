"""Every change StarFT makes to OpenCLIP's training code, in one place.

``open_clip_train.main.main`` (open_clip_torch 3.3) imports its helpers by name, so StarFT runs it
unchanged after rebinding these names on that module (restored on exit):

=============================  ===========================================================
``parse_args``                 upstream's parser, then the StarFT settings added to ``args``
                               (so they land in ``params.txt``, the log and wandb's config)
``create_model_and_transforms``  upstream's, then the frozen teacher copied from the fresh
                               model (before lock, grad checkpointing, DDP, compile, resume);
                               CLIP text towers learn to stop at the batch's longest caption
``get_data``                   StarFT's labelled training data; val/ImageNet eval upstream's
``create_loss``                ``StarLoss`` (a ``ClipLoss`` subclass); not with patches/0003
``train_one_epoch``            StarFT's epoch loop (batches carry spurious captions + labels);
                               not with patches/0003
``pt_load``                    upstream's; a bare (model-only) ``--resume`` file, which upstream
                               loads as the starting weights, is loaded into the teacher too
``torch``                      upstream's ``torch`` with two overrides: ``torch.save`` adds the
                               StarFT settings to each checkpoint and writes it under a temporary
                               name first (a killed run never leaves a partial ``epoch_N.pt``
                               for ``--resume latest``); DDP drops ``device_ids`` for
                               CPU modules (upstream passes them, DDP rejects them; gloo runs)
=============================  ===========================================================

With ``patches/0003-plugin-hook-losses-and-train-steps.patch`` applied to OpenCLIP, the host
builds the loss and the train step itself, by name, from this package's entry points
(``plugin.py``: ``--loss starft --train-step starft``, added to the command line here), and
``create_loss`` and ``train_one_epoch`` stay upstream's. ``open_clip_train.zero_shot.accuracy``
gets the fix upstream made after 3.3.0 (numpy ≥ 2.4 refuses ``float()`` of a 1-element array).
Optimizer, scheduler, checkpointing, ``--resume latest``, logging, distributed set-up and
zero-shot ImageNet eval stay upstream's.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import types

import open_clip_train.main as host
import open_clip_train.zero_shot as host_zero_shot
import torch

from open_clip_starft.host import plugin
from open_clip_starft.host import step as starft_train
from open_clip_starft.method.captions import CaptionBuilder, load_classnames, load_templates
from open_clip_starft.data.training import get_train_data
from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.errors import StarftError
from open_clip_starft.host.preemption import checkpoint_name
from open_clip_starft.host.teacher import TeacherImageCache, TeacherTextCache, fingerprint, make_teacher
from open_clip_starft.host.text_prefix import install_prefix_encoding


def zero_shot_accuracy(output, target, topk=(1,)):
    """``open_clip_train.zero_shot.accuracy`` as fixed upstream after 3.3.0 (numpy ≥ 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() for k in topk]


def cpu_safe_ddp(module, device_ids=None, **kwargs):
    """DDP that leaves out ``device_ids`` for a CPU module, which DDP rejects."""
    if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
        device_ids = None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


class _Overlay(types.ModuleType):
    """A module that answers with ``overrides`` first and with ``base`` for everything else."""

    def __init__(self, base, **overrides):
        super().__init__(base.__name__)
        self.__dict__.update(overrides)
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)


def starft_settings(args) -> dict:
    """The ``starft_*`` entries of ``args`` (what each checkpoint records under ``"starft"``)."""
    return {k: v for k, v in vars(args).items() if k.startswith("starft_")}


class StarftHooks:
    """Holds one run's StarFT state (settings, caption builder, teacher) and the rebound names."""

    def __init__(self, starft: argparse.Namespace):
        self.starft = starft
        self.builder: CaptionBuilder | None = None
        self.teacher: torch.nn.Module | None = None
        self.text_cache: TeacherTextCache | None = None
        self.image_cache = TeacherImageCache() if starft.starft_teacher_image_cache and starft.starft_lambda > 0 else None
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches done) of a preemption checkpoint
        self.checkpoint_path: str | None = None
        # OpenCLIP with patches/0003 loads StarFT's loss and train step by name (entry points)
        self.use_plugin_hook = plugin.host_has_plugin_hook()
        self._saved: dict = {}

    # -- installing -------------------------------------------------------------------------
    def __enter__(self):
        host_names = {
            "parse_args": self.parse_args,
            "create_model_and_transforms": self.create_model_and_transforms,
            "get_data": self.get_data,
            "pt_load": self.pt_load,
            "torch": _Overlay(torch, save=self.save_checkpoint, nn=_Overlay(
                torch.nn, parallel=_Overlay(torch.nn.parallel, DistributedDataParallel=cpu_safe_ddp))),
        }
        if not self.use_plugin_hook:  # else the host loads plugin.create_loss and plugin.StarftStep by name
            host_names.update(create_loss=self.create_loss, train_one_epoch=self.train_one_epoch)
        plugin.ACTIVE = self
        self._saved = {(host, name): getattr(host, name) for name in host_names}
        self._saved[(host_zero_shot, "accuracy")] = host_zero_shot.accuracy
        for name, value in host_names.items():
            setattr(host, name, value)
        host_zero_shot.accuracy = zero_shot_accuracy
        return self

    def __exit__(self, *exc):
        plugin.ACTIVE = None
        for (module, name), value in self._saved.items():
            setattr(module, name, value)
        return False

    def original(self, name):
        return self._saved[(host, name)]

    # -- the hooks --------------------------------------------------------------------------
    def parse_args(self, argv):
        argv = list(argv)
        if self.use_plugin_hook:
            for flag in ("--loss", "--train-step"):
                if any(a == flag or a.startswith(flag + "=") for a in argv):
                    raise StarftError(f"{flag} is set by open_clip_starft (to {plugin.NAME!r}): drop {flag}")
            argv += ["--loss", plugin.NAME, "--train-step", plugin.NAME]
        args = self.original("parse_args")(argv)
        vars(args).update(vars(self.starft))
        if args.accum_freq > 1:
            raise StarftError(f"--accum-freq {args.accum_freq} is not supported by StarFT: "
                              "use --accum-freq 1 with a larger --batch-size or more processes")
        if args.distill_model is not None:
            raise StarftError("--distill-model cannot be combined with StarFT: the frozen zero-shot model is "
                              "StarFT's teacher already; drop --distill-model/--distill-pretrained")
        if args.siglip or "coca" in args.model.lower():
            raise StarftError("StarFT fine-tunes CLIP-style models with the contrastive loss: "
                              "drop --siglip or pick a non-CoCa --model")
        if args.train_data is None and args.dataset_type == "synthetic":
            raise StarftError("--dataset-type synthetic has no class labels: pass --train-data shards with 'cls'")
        self.builder = CaptionBuilder(
            load_classnames(args.starft_classnames), load_templates(args.starft_templates),
            suffix=args.starft_suffix,
            descriptors=load_descriptors(args.starft_concepts) if args.starft_suffix == "spurious" else (),
            random_words=args.starft_random_words)
        args.starft_num_classes = self.builder.num_classes
        return args

    def create_model_and_transforms(self, *a, **kw):
        model, preprocess_train, preprocess_val = self.original("create_model_and_transforms")(*a, **kw)
        if self.starft.starft_lambda > 0:
            self.teacher = make_teacher(model)
            install_prefix_encoding(self.teacher)
            if self.starft.starft_teacher_text_cache_mb > 0 and self.starft.starft_suffix != "random":
                self.text_cache = TeacherTextCache(self.starft.starft_teacher_text_cache_mb)
            logging.info(f"StarFT teacher: a frozen copy of the initial model (fingerprint Σ|θ| = {fingerprint(self.teacher):.10g})")
        if self.use_plugin_hook:
            logging.info("StarFT: OpenCLIP has the plugin hook (patches/0003): loss and train step 'starft' by name")
        if install_prefix_encoding(model):
            logging.info("StarFT: the text tower runs only as far as the longest caption of each batch (exact)")
        return model, preprocess_train, preprocess_val

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        eval_args = copy.copy(args)
        eval_args.train_data = None
        if eval_args.dataset_type == "synthetic":
            eval_args.dataset_type = "auto"
        data = self.original("get_data")(eval_args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if args.train_data:
            data["train"] = get_train_data(args, preprocess_fns[0], self.builder, epoch=epoch, tokenizer=tokenizer,
                                           preprocess_plain=preprocess_fns[1] if self.image_cache is not None else None)
        return data

    def create_loss(self, args):
        return plugin.create_loss(args)

    def first_batch(self, epoch: int) -> int:
        """Batches of ``epoch`` a resumed preemption checkpoint had done, else 0."""
        return self.resume_at[1] if self.resume_at and self.resume_at[0] == epoch else 0

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        if self.teacher is not None and host.is_master(args):
            logging.info(f"StarFT teacher fingerprint at epoch {epoch}: {fingerprint(self.teacher):.10g}")
        start_batch = self.first_batch(epoch)

        def on_preempt(batches_done: int) -> str:
            return self.save_preemption_checkpoint(model, optimizer, scaler, epoch, batches_done, args)

        starft_train.train_one_epoch(model, self.teacher, data, loss, epoch, optimizer, scaler, scheduler, args,
                                     tb_writer=tb_writer, text_cache=self.text_cache, start_batch=start_batch,
                                     on_preempt=on_preempt, image_cache=self.image_cache)
        logging.info(f"StarFT rank {args.rank}: model fingerprint after epoch {epoch}: {fingerprint(model):.10g}")

    def save_preemption_checkpoint(self, model, optimizer, scaler, epoch, batches_done, args) -> str:
        """Upstream's checkpoint dict for a run stopped after ``batches_done`` batches of ``epoch``."""
        path = os.path.join(args.checkpoint_path, checkpoint_name(epoch, batches_done))
        if args.save_logs:
            checkpoint = {
                "epoch": epoch,  # epochs completed: upstream resumes at this epoch
                "name": args.name,
                "state_dict": getattr(model, "_orig_mod", model).state_dict(),
                "optimizer": optimizer.state_dict(),
            }
            if scaler is not None:
                checkpoint["scaler"] = scaler.state_dict()
            self.save_checkpoint(checkpoint, path, batches_done=batches_done)
            logging.info(f"StarFT: stopped by signal after batch {batches_done} of epoch {epoch}; saved {path}")
        if args.distributed:
            torch.distributed.barrier()
        return path

    def pt_load(self, path, map_location="cpu"):
        checkpoint = self.original("pt_load")(path, map_location=map_location)
        if "batches_done" in checkpoint.get("starft", {}):
            self.resume_at = (checkpoint["epoch"], checkpoint["starft"]["batches_done"])
            logging.info(f"StarFT: resuming epoch {self.resume_at[0]} after batch {self.resume_at[1]} (preemption checkpoint)")
        if self.teacher is not None and "epoch" not in checkpoint:
            state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
            self.teacher.load_state_dict(state)
            logging.info(f"StarFT teacher: loaded the bare --resume weights {path} as the zero-shot model "
                         f"(fingerprint Σ|θ| = {fingerprint(self.teacher):.10g})")
        return checkpoint

    def save_checkpoint(self, obj, f, *a, batches_done: int | None = None, **kw):
        if not (isinstance(obj, dict) and "state_dict" in obj and "epoch" in obj):
            return torch.save(obj, f, *a, **kw)
        obj = {**obj, "starft": starft_settings(self.starft)}
        if batches_done is not None:
            obj["starft"]["batches_done"] = batches_done
        if not isinstance(f, (str, os.PathLike)):
            return torch.save(obj, f, *a, **kw)
        partial = f"{os.fspath(f)}.partial"
        torch.save(obj, partial, *a, **kw)
        os.replace(partial, f)
