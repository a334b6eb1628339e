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
``pt_load``                    upstream's, through ``checkpoint.load_resume``: a foreign, crafted or
                               corrupt ``--resume`` file is one line; a training checkpoint's
                               settings are compared with this run's (``state.changes``)
``get_latest_checkpoint``      ``checkpoint.latest_checkpoint``: the furthest training position of
                               ``epoch_latest.pt``, ``epoch_N.pt`` and ``epoch_E_step_K.pt``
``open``                       the builtin, except that ``params.txt`` is written atomically
``plugins``                    (with patches/0003) upstream's, building the step with the run state
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
Optimizer, scheduler, checkpoint contents, logging, distributed set-up and zero-shot ImageNet eval
stay upstream's.

What the hooks learn while the run starts (class count, what ``--resume`` loaded, the settings
history) is kept in one ``RunState`` (``state.py``) that the step and the checkpoint writer are built
with; ``args`` carries only flags.
"""
from __future__ import annotations

import argparse
import builtins
import copy
import logging
import os
import types

import open_clip_train.main as host
import open_clip_train.zero_shot as host_zero_shot
import torch
from open_clip_train.distributed import world_info_from_env

from open_clip_starft.data import files
from open_clip_starft.data.training import get_train_data
from open_clip_starft.errors import ConfigError
from open_clip_starft.host import loop, plugin
from open_clip_starft.host.checkpoint import check_fits, latest_checkpoint, load_resume, save_checkpoint
from open_clip_starft.host.params import refuse_unsupported, starft_settings
from open_clip_starft.host.runlock import RunLock
from open_clip_starft.host.state import Resumed, RunState, changes, recorded_history
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
    """The rebound names for one run. Per-run state lives on this object, never in module globals:
    ``self.args`` is upstream's ``args`` from ``parse_args`` (flags only); ``self.state`` the
    ``RunState`` the step and the checkpoint writer are built with; ``self.step`` the ``StarftStep``
    (built here, or by OpenCLIP's plugin hook through ``create_train_step`` with patches/0003)."""

    def __init__(self, starft: argparse.Namespace, validation=None):
        self.starft = starft
        self.validation = validation  # (args, model, preprocess_val) -> the --starft-val evaluation, or None
        self.state = RunState(settings=starft_settings(starft))
        self.args: argparse.Namespace | None = None
        self.builder: CaptionBuilder | None = None
        self.model: torch.nn.Module | None = None  # as created, to check a --resume file's weights against
        self.step: StarftStep | None = None
        # OpenCLIP with patches/0003 loads StarFT's loss and train step by name (entry points)
        self.use_plugin_hook = plugin.host_has_plugin_hook()
        self.lock: RunLock | None = None
        self._save_most_recent = False  # restored after upstream resolved --resume latest (see parse_args)
        self._saved: dict = {}

    # -- installing -------------------------------------------------------------------------
    def __enter__(self):
        host_names = {
            "parse_args": self.parse_args,
            "create_model_and_transforms": self.create_model_and_transforms,
            "get_data": self.get_data,
            "pt_load": self.pt_load,
            "get_latest_checkpoint": self.get_latest_checkpoint,
            "open": self.open,
            "torch": _Overlay(torch, save=self.save_checkpoint, nn=_Overlay(
                torch.nn, parallel=_Overlay(torch.nn.parallel, DistributedDataParallel=cpu_safe_ddp))),
        }
        if self.use_plugin_hook:  # the host loads plugin.create_loss and step.StarftStep by name
            host_names["plugins"] = _Overlay(host.plugins, create_train_step=self.create_train_step)
        else:
            host_names.update(create_loss=plugin.create_loss, train_one_epoch=self.train_one_epoch)
        self._saved = {(host, name): getattr(host, name, None) for name in host_names}
        self._saved[(host_zero_shot, "accuracy")] = host_zero_shot.accuracy
        for name, value in host_names.items():
            setattr(host, name, value)
        host_zero_shot.accuracy = zero_shot_accuracy
        return self

    def __exit__(self, *exc):
        for (module, name), value in self._saved.items():
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)
        if self.lock is not None:
            self.lock.release()
        return False

    def original(self, name):
        return self._saved[(host, name)]

    # -- the hooks --------------------------------------------------------------------------
    def parse_args(self, argv):
        argv = list(argv)
        if self.use_plugin_hook:
            for flag in ("--loss", "--train-step"):
                if any(a == flag or a.startswith(flag + "=") for a in argv):
                    raise ConfigError(f"{flag} is set by open_clip_starft (to {plugin.NAME!r}): drop {flag}")
            argv += ["--loss", plugin.NAME, "--train-step", plugin.NAME]
        args = self.original("parse_args")(argv)
        vars(args).update(vars(self.starft))
        refuse_unsupported(args)
        self.builder = CaptionBuilder(
            load_classnames(args.starft_classnames), load_templates(args.starft_templates),
            suffix=args.starft_suffix,
            descriptors=load_descriptors(args.starft_concepts) if args.starft_suffix == "spurious" else (),
            random_words=args.starft_random_words)
        self.state.num_classes = self.builder.num_classes
        if args.resume == "latest" and args.save_most_recent and args.remote_sync is None:
            # upstream would look only at epoch_latest.pt: let it ask get_latest_checkpoint (ours) instead
            args.save_most_recent, self._save_most_recent = False, True
        self.lock_run_folder(args)
        self.args = args
        return args

    def lock_run_folder(self, args) -> None:
        """The master process holds ``LOGS/NAME/train.lock`` while it runs (``runlock.py``)."""
        if args.logs and str(args.logs).lower() != "none" and args.name and world_info_from_env()[1] == 0:
            self.lock = RunLock(os.path.join(args.logs, args.name))
            self.lock.acquire()

    def create_model_and_transforms(self, *a, **kw):
        model, preprocess_train, preprocess_val = self.original("create_model_and_transforms")(*a, **kw)
        if self.args.starft_channels_last:  # before the teacher's copy, the optimizer and DDP see the parameters
            model.to(memory_format=torch.channels_last)
            logging.info("StarFT: weights in channels-last memory layout (--starft-channels-last)")
        self.model = model
        self.args.save_most_recent = self.args.save_most_recent or self._save_most_recent
        self.state.start(self.args)  # the settings history from step 0 (a resumed checkpoint's replaces it)
        if self.validation is not None:  # every --starft-val set is checked here, before the first step
            self.state.validation = self.validation(self.args, model, preprocess_val)
        if install_prefix_encoding(model):
            logging.info("StarFT: the text tower runs only as far as the longest caption of each batch (exact)")
        if self.use_plugin_hook:
            logging.info("StarFT: OpenCLIP has the plugin hook (patches/0003): loss and train step 'starft' by name")
        else:  # the moment patches/0003 builds it: the model as created, before lock, DDP, compile, resume
            self.step = StarftStep(self.args, model, self.state)
        return model, preprocess_train, preprocess_val

    def create_train_step(self, args, model):
        """patches/0003's ``plugins.create_train_step``: the step registered as ``--train-step`` (by name,
        from the entry points), built with this run's state."""
        self.step = self.original("plugins").load(self.original("plugins").TRAIN_STEPS, args.train_step)(
            args, model, self.state)
        return self.step

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
        loop.train_one_epoch_with_step(model, data, loss, epoch, optimizer, scaler, scheduler, self.step, args,
                                       tb_writer=tb_writer)

    def get_latest_checkpoint(self, path: str, remote: bool):
        """``--resume latest``: the checkpoint holding the furthest training position (``checkpoint.py``)."""
        return self.original("get_latest_checkpoint")(path, remote) if remote else latest_checkpoint(path)

    def pt_load(self, path, map_location="cpu"):
        """Upstream's loader for ``--resume``, refusing in one line a file that is no checkpoint or does not
        fit the model, and a training checkpoint with other settings (``check_resumed_settings``); what
        was loaded goes to the run state: a training checkpoint's ``epoch`` (and ``batches_done`` for a
        mid-epoch one), or ``bare`` model-only weights, which the step loads into the teacher too."""
        checkpoint = load_resume(self.original("pt_load"), path, map_location=map_location)
        if self.model is not None:
            check_fits(self.model, checkpoint, path, self.args.model)
        if "epoch" in checkpoint:
            entry = checkpoint.get("starft") or {}
            self.state.resumed = Resumed(path, int(checkpoint["epoch"]), int(entry.get("batches_done", 0)))
            self.check_resumed_settings(entry, path)
        else:
            self.state.resumed = Resumed(path, bare=True)
        return checkpoint

    def check_resumed_settings(self, entry: dict, path: str) -> None:
        """Refuse (one line naming each difference, old → new) to resume a checkpoint trained with other
        settings unless ``--starft-allow-changed-settings``; refuse always when nothing is left to train.
        The run's settings history continues the checkpoint's."""
        args, resumed = self.args, self.state.resumed
        mid_epoch = resumed.batches_done > 0
        if resumed.epoch > args.epochs or (mid_epoch and resumed.epoch >= args.epochs):
            done = f"{resumed.epoch} epoch(s)" + (f" and {resumed.batches_done} batches" if mid_epoch else "")
            raise ConfigError(f"--resume {path} has {done} done: nothing is left to train with --epochs {args.epochs}; "
                              f"pass --epochs above {resumed.epoch} to train further")
        history = recorded_history(entry)
        if not history:
            logging.warning(f"StarFT: --resume {path} records no StarFT settings (not written by open_clip_starft): "
                            "they cannot be compared with this run's")
            return
        new = self.state.history_entry(args, resumed.epoch, resumed.batches_done)
        found = changes(history[-1], new, mid_epoch)
        if found and not args.starft_allow_changed_settings:
            raise ConfigError(f"--resume {path} was trained with other settings: {'; '.join(found)}: pass the "
                              "checkpoint's values, or --starft-allow-changed-settings to continue with the new ones "
                              "(recorded in the checkpoint's settings history)")
        if found:
            logging.warning(f"StarFT: continuing {path} with changed settings: {'; '.join(found)}")
            history.append(new)
        self.state.history = history

    def save_checkpoint(self, obj, f, *a, **kw):
        """``torch.save`` as upstream's ``main`` sees it: checkpoint dicts get the StarFT settings and an atomic write."""
        return save_checkpoint(obj, f, self.state, *a, **kw)

    def open(self, file, mode="r", *a, **kw):
        """The builtin ``open`` for upstream's ``main``, except that ``params.txt`` is written atomically
        (a failed or cut write, e.g. a full disk on a resumed run, never leaves it truncated)."""
        if "w" in mode and os.path.basename(os.fspath(file)) == "params.txt":
            return files.atomic_open(file, mode)
        return builtins.open(file, mode, *a, **kw)
