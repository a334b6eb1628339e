"""The one checkpoint writer: upstream's checkpoint dicts plus a ``"starft"`` entry, written atomically.

Every training checkpoint (upstream's ``epoch_N.pt``, through the hooks' ``torch.save``, and
StarFT's mid-epoch ``epoch_E_step_K.pt``) gets ``"starft"``: the ``--starft-*`` settings, and for
a mid-epoch checkpoint ``batches_done``. It is written under ``NAME.partial`` and renamed, so a
killed run never leaves a partial ``epoch_N.pt`` for ``--resume latest``.
"""
from __future__ import annotations

import logging
import os

import torch

# Entries the hooks add to ``args`` that are run state, not flags: never recorded in checkpoints.
#   starft_num_classes: the class names' count (parse_args)
#   starft_resume: what ``--resume`` loaded, for the step (pt_load; see hooks.StarftHooks.pt_load)
RUN_STATE = ("starft_num_classes", "starft_resume")


def starft_settings(args) -> dict:
    """The ``--starft-*`` flag values on ``args`` (what each checkpoint records under ``"starft"``)."""
    return {k: v for k, v in vars(args).items() if k.startswith("starft_") and k not in RUN_STATE}


def checkpoint_name(epoch: int, batches_done: int) -> str:
    """``epoch_{E}_step_{K}.pt`` for K batches done in epoch E (0-based): by OpenCLIP's natural sort
    it comes after ``epoch_E.pt`` and before ``epoch_{E+1}.pt``, so ``--resume latest`` takes it."""
    return f"epoch_{epoch}_step_{batches_done}.pt"


def save_checkpoint(obj, f, settings: dict, *args, batches_done: int | None = None, **kwargs):
    """``torch.save(obj, f)``; a training checkpoint dict (``state_dict`` and ``epoch``) gets
    ``"starft": settings`` (+ ``batches_done``) and, saved to a path, is written atomically."""
    if not (isinstance(obj, dict) and "state_dict" in obj and "epoch" in obj):
        return torch.save(obj, f, *args, **kwargs)
    obj = {**obj, "starft": dict(settings)}
    if batches_done is not None:
        obj["starft"]["batches_done"] = batches_done
    if not isinstance(f, (str, os.PathLike)):
        return torch.save(obj, f, *args, **kwargs)
    partial = f"{os.fspath(f)}.partial"
    torch.save(obj, partial, *args, **kwargs)
    os.replace(partial, f)


def weights_are_finite(model: torch.nn.Module) -> bool:
    """True when every parameter of ``model`` is finite (one device sync)."""
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def save_mid_epoch(model, optimizer, scaler, epoch: int, batches_done: int, args) -> str:
    """Upstream's checkpoint dict for a run stopped after ``batches_done`` batches of ``epoch``,
    written by the master process as ``epoch_E_step_K.pt``; every process calls it (a barrier
    under torch.distributed). Returns the path."""
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
        save_checkpoint(checkpoint, path, starft_settings(args), batches_done=batches_done)
        logging.info(f"StarFT: saved {path} after batch {batches_done} of epoch {epoch}")
    if args.distributed:
        torch.distributed.barrier()
    return path
