"""Every change StarFT makes to OpenCLIP's training code, in one place.

``open_clip_train.main.main`` (open_clip_torch 3.3) imports its helpers by name, so StarFT runs it
unchanged after rebinding these names on that module (restored on exit):

=============================  ===========================================================
``parse_args``                 upstream's parser, then the StarFT settings added to ``args``
                               (so they land in ``params.txt``, the log and wandb's config)
``create_model_and_transforms``  upstream's; CLIP text towers learn to stop at the batch's
                               longest caption; without patches/0003 the ``StarftStep`` (and
                               its frozen teacher) is built here from the fresh model
``get_data``                   StarFT's labelled training data; val/ImageNet eval upstream's
``create_loss``                ``StarLoss`` (a ``ClipLoss`` subclass); not with patches/0003
``train_one_epoch``            ``host/loop.py``'s generic loop around the ``StarftStep`` (the
                               loop patches/0003 adds); not with patches/0003
``pt_load``                    upstream's; what ``--resume`` loaded goes to
                               ``args.starft_resume`` (a mid-epoch checkpoint's step; a bare
                               model-only file, which the step loads into the teacher too)
``torch``                      upstream's ``torch`` with two overrides: ``torch.save`` adds the
                               StarFT settings to each checkpoint and writes it under a temporary
                               name first (``checkpoint.py``: a killed run never leaves a partial
                               ``epoch_N.pt``); DDP drops ``device_ids`` for
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
import types

import open_clip_train.main as host
import open_clip_train.zero_shot as host_zero_shot
import torch

from open_clip_starft.data.training import get_train_data
from open_clip_starft.errors import StarftError
from open_clip_starft.host import loop, plugin
from open_clip_starft.host.checkpoint import save_checkpoint, starft_settings
from open_clip_starft.host.step import StarftStep
from open_clip_starft.host.text_prefix import install_prefix_encoding
from open_clip_starft.method.captions import CaptionBuilder, load_classnames, load_templates
from open_clip_starft.method.descriptors import load_descriptors


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


class StarftHooks:
    """The rebound names for one run. Per-run state lives on this object or on ``args`` (the object
    upstream's ``main`` and the train step share), never in module globals: ``self.args`` is
    upstream's ``args`` from ``parse_args``; ``self.step`` is the ``StarftStep`` these hooks build
    when OpenCLIP lacks patches/0003 (with the patch OpenCLIP builds and holds it)."""

    def __init__(self, starft: argparse.Namespace):
        self.starft = starft
        self.args: argparse.Namespace | None = None
        self.builder: CaptionBuilder | None = None
        self.step: StarftStep | None = None
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
        if not self.use_plugin_hook:  # else the host loads plugin.create_loss and step.StarftStep by name
            host_names.update(create_loss=plugin.create_loss, train_one_epoch=self.train_one_epoch)
        self._saved = {(host, name): getattr(host, name) for name in host_names}
        self._saved[(host_zero_shot, "accuracy")] = host_zero_shot.accuracy
        for name, value in host_names.items():
            setattr(host, name, value)
        host_zero_shot.accuracy = zero_shot_accuracy
        return self

    def __exit__(self, *exc):
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
        if args.model.startswith("local-dir:") and args.pretrained:
            raise StarftError(
                f"--pretrained {args.pretrained} is ignored by OpenCLIP for --model {args.model} (the run would "
                "fine-tune the folder's weights and take them as the teacher): export the checkpoint as a local-dir "
                "model with `open-clip-starft export --checkpoint CKPT --model NAME --out DIR` and pass "
                "--model local-dir:DIR, or pass --model NAME --pretrained CKPT")
        if args.train_data is None and args.dataset_type == "synthetic":
            raise StarftError("--dataset-type synthetic has no class labels: pass --train-data shards with 'cls'")
        self.builder = CaptionBuilder(
            load_classnames(args.starft_classnames), load_templates(args.starft_templates),
            suffix=args.starft_suffix,
            descriptors=load_descriptors(args.starft_concepts) if args.starft_suffix == "spurious" else (),
            random_words=args.starft_random_words)
        args.starft_num_classes = self.builder.num_classes  # run state for the step (checkpoint.RUN_STATE)
        self.args = args
        return args

    def create_model_and_transforms(self, *a, **kw):
        model, preprocess_train, preprocess_val = self.original("create_model_and_transforms")(*a, **kw)
        if install_prefix_encoding(model):
            logging.info("StarFT: the text tower runs only as far as the longest caption of each batch (exact)")
        if self.use_plugin_hook:
            logging.info("StarFT: OpenCLIP has the plugin hook (patches/0003): loss and train step 'starft' by name")
        else:  # the moment patches/0003 builds it: the model as created, before lock, DDP, compile, resume
            self.step = StarftStep(self.args, model)
        return model, preprocess_train, preprocess_val

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        eval_args = copy.copy(args)
        eval_args.train_data = None
        if eval_args.dataset_type == "synthetic":
            eval_args.dataset_type = "auto"
        data = self.original("get_data")(eval_args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if args.train_data:
            image_cache = args.starft_teacher_image_cache and args.starft_lambda > 0
            data["train"] = get_train_data(args, preprocess_fns[0], self.builder, epoch=epoch, tokenizer=tokenizer,
                                           preprocess_plain=preprocess_fns[1] if image_cache else None)
        return data

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        loop.train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, self.step, args, tb_writer=tb_writer)

    def pt_load(self, path, map_location="cpu"):
        """Upstream's; what was loaded goes to ``args.starft_resume`` for the step: a training checkpoint's
        ``epoch`` (and ``batches_done`` for a mid-epoch one), or ``bare`` for model-only weights, which
        upstream loads as the starting weights and the step loads into the teacher too."""
        checkpoint = self.original("pt_load")(path, map_location=map_location)
        if "epoch" in checkpoint:
            resume = {"path": path, "epoch": checkpoint["epoch"]}
            if "batches_done" in checkpoint.get("starft", {}):
                resume["batches_done"] = checkpoint["starft"]["batches_done"]
        else:
            resume = {"path": path, "bare": True}
        self.args.starft_resume = resume
        return checkpoint

    def save_checkpoint(self, obj, f, *a, **kw):
        """``torch.save`` as upstream's ``main`` sees it: checkpoint dicts get the StarFT settings and an atomic write."""
        return save_checkpoint(obj, f, starft_settings(self.starft), *a, **kw)
