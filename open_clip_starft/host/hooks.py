"""The seam into OpenCLIP's training code: every step of ``open_clip_train.main.main`` (open_clip_torch
3.3) StarFT replaces, in one table (``SEAM``), applied in one place (``StarftHooks.main``).

Each step is a method of ``StarftHooks``, named as upstream's ``main`` calls it. With
``patches/0003-plugin-hook-losses-and-train-steps.patch`` installed, upstream's ``main(argv, hooks=...)``
calls these methods itself (``open_clip_train.plugins.Hooks`` lists the steps) and nothing of
``open_clip_train`` is rebound. Without it, the same methods are bound over upstream's names on the
module for the run (``unittest.mock.patch.object`` entries on one ``contextlib.ExitStack``; restored
on exit), and the two steps that have no name there are reached as follows:

=============================  ===========================================================
``parse_args``                 upstream's parser, then the StarFT settings added to ``args``
                               (so they land in ``params.txt``, the log and wandb's config);
                               with patches/0003, ``--loss starft --train-step starft``
``get_latest_checkpoint``      ``checkpoint.latest_checkpoint``: the furthest training position of
                               ``epoch_latest.pt``, ``epoch_N.pt`` and ``epoch_E_step_K.pt``
``create_model_and_transforms``  upstream's; CLIP text towers learn to stop at the batch's
                               longest caption; channels-last; the ``--starft-val`` sets checked
``create_train_step``          the ``StarftStep`` (and its frozen teacher), from the model as created
``open_params``                ``params.txt`` written atomically (``data.files.atomic_open``). Without
                               patches/0003 upstream writes it with the builtin ``open``, which is
                               never rebound: the previous ``params.txt`` is kept just before
                               and put back if the run stops before its data is read
``pt_load``                    upstream's, through ``checkpoint.load_resume``: a foreign, crafted or
                               corrupt ``--resume`` file is one line; a training checkpoint's
                               settings are compared with this run's (``state.changes``)
``get_data``                   StarFT's labelled training data; val/ImageNet eval upstream's
``create_loss``                ``StarLoss`` (a ``ClipLoss`` subclass, ``plugin.create_loss``), built
                               just before the epoch loop: marks the run started (``RunState.started``)
``train_one_epoch``            without patches/0003 only: ``host/loop.py``'s loop around the step
                               (the loop patches/0003 adds, character for character)
``save_checkpoint``            each checkpoint dict gets the StarFT settings and is written under a
                               temporary name first (``checkpoint.save_checkpoint``). Without
                               patches/0003 upstream calls ``torch.save``: ``torch`` is rebound on
                               the module to upstream's ``torch`` with that one function replaced
=============================  ===========================================================

Two fixes of upstream bugs are rebound only where the installed OpenCLIP lacks the patch making them:
DDP drops ``device_ids`` for CPU modules (patches/0001; gloo runs) and
``open_clip_train.zero_shot.accuracy`` works under numpy ≥ 2.4 (patches/0002). With patches 0001–0003
installed the seam rebinds nothing (the run's log says which names it rebound, if any).

Optimizer, scheduler, checkpoint contents, logging, distributed set-up and zero-shot ImageNet eval
stay upstream's. What the hooks learn while the run starts (class count, what ``--resume`` loaded, the
settings history) is kept in one ``RunState`` (``state.py``) that the step and the checkpoint writer
are built with; ``args`` carries only flags.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import logging
import os
import types
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import open_clip
import open_clip_train.data as host_data
import open_clip_train.file_utils as host_files
import open_clip_train.main as host
import open_clip_train.params as host_params
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

# upstream's own functions, from the modules that define them (the hooks call them; never rebound there)
UPSTREAM_LATEST_CHECKPOINT = host.get_latest_checkpoint


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


def host_lacks_ddp_fix() -> bool:
    """True when the installed ``open_clip_train.main`` passes CPU ``device_ids`` to DDP (no patches/0001)."""
    return "device.type != 'cpu'" not in inspect.getsource(host.main)


def host_lacks_accuracy_fix() -> bool:
    """True when the installed ``open_clip_train.zero_shot.accuracy`` fails under this numpy (no patches/0002)."""
    try:
        host_zero_shot.accuracy(torch.eye(2), torch.arange(2), topk=(1,))
    except TypeError:
        return True
    return False


class _Overlay(types.ModuleType):
    """A module that answers with ``overrides`` first and with ``base`` for everything else."""

    def __init__(self, base, **overrides):
        super().__init__(base.__name__)
        self.__dict__.update(overrides)
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)


@dataclass(frozen=True)
class Rebinding:
    """One name of ``open_clip_train`` the seam rebinds for a run: ``module.name`` → ``value(hooks)``,
    where ``needed(hooks)``; ``why`` says what it changes."""
    module: types.ModuleType
    name: str
    value: Callable[["StarftHooks"], object]
    needed: Callable[["StarftHooks"], bool]
    why: str


def _without_plugin_hook(hooks) -> bool:
    return not hooks.use_plugin_hook


def _host_torch(hooks) -> types.ModuleType:
    """Upstream's ``torch`` as ``open_clip_train.main`` sees it: ``save`` through ``save_checkpoint``
    (without patches/0003) and CPU-safe DDP (without patches/0001); everything else is ``torch``."""
    overrides = {}
    if not hooks.use_plugin_hook:
        overrides["save"] = hooks.save_checkpoint
    if host_lacks_ddp_fix():
        overrides["nn"] = _Overlay(torch.nn, parallel=_Overlay(torch.nn.parallel, DistributedDataParallel=cpu_safe_ddp))
    return _Overlay(torch, **overrides)


def _method(name: str) -> Callable[["StarftHooks"], object]:
    return lambda hooks: getattr(hooks, name)


# The seam: every name rebound, when, and why. With patches 0001-0003 installed no entry is needed.
SEAM = (
    *(Rebinding(host, name, _method(name), _without_plugin_hook, "StarftHooks." + name + " (patches/0003 calls it)")
      for name in ("parse_args", "get_latest_checkpoint", "create_model_and_transforms", "pt_load", "get_data",
                   "create_loss", "train_one_epoch")),
    Rebinding(host, "torch", _host_torch, lambda hooks: not hooks.use_plugin_hook or host_lacks_ddp_fix(),
          "torch.save → save_checkpoint (patches/0003 calls it); DDP without CPU device_ids (patches/0001)"),
    Rebinding(host_zero_shot, "accuracy", lambda hooks: zero_shot_accuracy, lambda hooks: host_lacks_accuracy_fix(),
          "numpy ≥ 2.4 (patches/0002)"),
)


class StarftHooks:
    """The steps StarFT replaces in one run (see ``SEAM``). Per-run state lives on this object, never in
    module globals: ``self.args`` is upstream's ``args`` from ``parse_args`` (flags only); ``self.state``
    the ``RunState`` the step and the checkpoint writer are built with; ``self.step`` the ``StarftStep``.
    Use it as a context manager around ``main``: ``with StarftHooks(starft) as hooks: hooks.main(argv)``."""

    def __init__(self, starft: argparse.Namespace, validation=None):
        self.starft = starft
        self.validation = validation  # (args, model, preprocess_val) -> the --starft-val evaluation, or None
        self.state = RunState(settings=starft_settings(starft))
        self.args: argparse.Namespace | None = None
        self.builder: CaptionBuilder | None = None
        self.model: torch.nn.Module | None = None  # as created, to check a --resume file's weights against
        self.step: StarftStep | None = None
        # OpenCLIP with patches/0003 calls these hooks itself (main(argv, hooks=self))
        self.use_plugin_hook = plugin.host_has_plugin_hook()
        self.lock: RunLock | None = None
        self.rebound: list[str] = []  # "module.name" of each SEAM entry applied
        self._stack = contextlib.ExitStack()
        self._save_most_recent = False  # restored after upstream resolved --resume latest (see parse_args)
        self._params_before: tuple[str, str] | None = None  # (params.txt, its content before upstream writes it)

    # -- installing: the one place the seam is applied -------------------------------------------------
    def __enter__(self):
        self.rebound = []
        with contextlib.ExitStack() as stack:
            stack.callback(self._release)
            for entry in SEAM:
                if entry.needed(self):
                    stack.enter_context(mock.patch.object(entry.module, entry.name, entry.value(self)))
                    self.rebound.append(f"{entry.module.__name__}.{entry.name}")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def _release(self) -> None:
        """On leaving: the run folder's lock released; a ``params.txt`` kept aside put back (unpatched path)."""
        if self._params_before is not None:
            files.write_text(*self._params_before)
            self._params_before = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def main(self, argv) -> int | None:
        """Upstream's ``main(argv)`` with these hooks: passed to it (patches/0003) or rebound (``SEAM``)."""
        return host.main(argv, hooks=self) if self.use_plugin_hook else host.main(argv)

    # -- the hooks --------------------------------------------------------------------------
    def parse_args(self, argv):
        argv = list(argv)
        if self.use_plugin_hook:
            for flag in ("--loss", "--train-step"):
                if any(a == flag or a.startswith(flag + "=") for a in argv):
                    raise ConfigError(f"{flag} is set by open_clip_starft (to {plugin.NAME!r}): drop {flag}")
            argv += ["--loss", plugin.NAME, "--train-step", plugin.NAME]
        args = host_params.parse_args(argv)
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
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(*a, **kw)
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
            logging.info("StarFT: OpenCLIP has the plugin hook (patches/0003): it calls StarFT's hooks, loss and "
                         "train step 'starft'")
        else:  # the moment patches/0003 builds the step: the model as created, before lock, DDP, compile, resume
            self.step = StarftStep(self.args, model, self.state)
            self.keep_previous_params()
        logging.info(f"StarFT: rebound on open_clip_train for this run: {', '.join(self.rebound) or 'nothing'}")
        return model, preprocess_train, preprocess_val

    def create_train_step(self, args, model):
        """The ``StarftStep`` (``--train-step starft``), built with this run's state (patches/0003 calls it
        with the model as created, before lock, DDP, compile and resume)."""
        self.step = StarftStep(args, model, self.state)
        return self.step

    def keep_previous_params(self) -> None:
        """Without patches/0003 upstream writes ``params.txt`` next, with the builtin ``open`` (truncating
        first): its previous content is kept now and written back (atomically) if the run stops before
        ``get_data``, so a failed or cut write (a full disk on a resumed run) never loses it."""
        args = self.args
        path = os.path.join(args.logs, args.name, "params.txt") if args.logs and args.name else None
        if path and args.rank == 0 and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self._params_before = (path, f.read())

    def params_written(self) -> None:
        """Upstream wrote the new ``params.txt`` whole (it does before reading data): the previous one goes."""
        self._params_before = None

    def open_params(self, path):
        """``params.txt``, written atomically (a failed or cut write, e.g. a full disk on a resumed run,
        never leaves it truncated): patches/0003 calls it."""
        return files.atomic_open(path, "w")

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        eval_args = copy.copy(args)
        eval_args.train_data = None
        if eval_args.dataset_type == "synthetic":
            eval_args.dataset_type = "auto"
        self.params_written()
        data = host_data.get_data(eval_args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if args.train_data:
            image_cache = args.starft_teacher_image_cache and args.starft_lambda > 0
            data["train"] = get_train_data(args, preprocess_fns[0], self.builder, epoch=epoch, tokenizer=tokenizer,
                                           preprocess_plain=preprocess_fns[1] if image_cache else None)
        return data

    def create_loss(self, args):
        """``StarLoss`` (``plugin.create_loss``), built just before the epoch loop: from here on the run has
        started (``RunState.started``: a failure keeps its folder, ``preflight.RunFolderGuard``)."""
        self.state.started = True
        return plugin.create_loss(args)

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        loop.train_one_epoch_with_step(model, data, loss, epoch, optimizer, scaler, scheduler, self.step, args,
                                       tb_writer=tb_writer)

    def get_latest_checkpoint(self, path: str, remote: bool):
        """``--resume latest``: the checkpoint holding the furthest training position (``checkpoint.py``)."""
        return UPSTREAM_LATEST_CHECKPOINT(path, remote) if remote else latest_checkpoint(path)

    def pt_load(self, path, map_location="cpu"):
        """Upstream's loader for ``--resume``, refusing in one line a file that is no checkpoint or does not
        fit the model, and a training checkpoint with other settings (``check_resumed_settings``); what
        was loaded goes to the run state: a training checkpoint's ``epoch`` (and ``batches_done`` for a
        mid-epoch one), or ``bare`` model-only weights, which the step loads into the teacher too."""
        checkpoint = load_resume(host_files.pt_load, path, map_location=map_location)
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
        """Each checkpoint upstream's ``main`` saves: checkpoint dicts get the StarFT settings and an atomic
        write (patches/0003 calls it; without it, upstream's ``torch.save``)."""
        return save_checkpoint(obj, f, self.state, *a, **kw)
