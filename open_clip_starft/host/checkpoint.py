"""The one checkpoint writer and reader: upstream's checkpoint dicts plus a ``"starft"`` entry.

Every training checkpoint (upstream's ``epoch_N.pt`` and ``epoch_latest.pt``, through the hooks'
``torch.save``, and StarFT's mid-epoch ``epoch_E_step_K.pt``) gets ``"starft"``: the ``--starft-*``
settings, their history (``state.RunState.checkpoint_entry``) and, for a mid-epoch checkpoint,
``batches_done``. It is written through ``data.files.atomic_path`` (a temporary name, renamed when
whole), so a killed or failed save never leaves a partial ``epoch_N.pt`` for ``--resume latest``
and never replaces the previous checkpoint; a full disk is one line (``StorageError``).

``latest_checkpoint`` is ``--resume latest``'s choice: the checkpoint holding the furthest training
position, whichever of upstream's names (``epoch_latest.pt`` included) or StarFT's it has.
``load_resume`` reads a ``--resume`` file with upstream's loader, turning a foreign, crafted or
corrupt file into one line naming it.
"""
from __future__ import annotations

import logging
import os
import re

import torch

from open_clip_starft.data import files
from open_clip_starft.data.weights import read_checkpoint, strip_ddp_prefix
from open_clip_starft.errors import DataError, one_line
from open_clip_starft.host.state import RunState

LATEST = "epoch_latest.pt"  # upstream's --save-most-recent name
_NAMED = re.compile(r"epoch_(\d+)(?:_step_(\d+))?\.pt")


def checkpoint_name(epoch: int, batches_done: int) -> str:
    """``epoch_{E}_step_{K}.pt`` for K batches done in epoch E (0-based): by OpenCLIP's natural sort
    it comes after ``epoch_E.pt`` and before ``epoch_{E+1}.pt``."""
    return f"epoch_{epoch}_step_{batches_done}.pt"


def is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "epoch" in obj


def save_checkpoint(obj, f, state: RunState, *args, batches_done: int | None = None, **kwargs):
    """``torch.save(obj, f)``; a training checkpoint dict gets ``"starft"`` (``state``'s settings and
    history, + ``batches_done``) and, saved to a path, is written atomically (``files.atomic_path``)."""
    if not is_training_checkpoint(obj):
        return torch.save(obj, f, *args, **kwargs)
    obj = {**obj, "starft": state.checkpoint_entry(batches_done)}
    if not isinstance(f, (str, os.PathLike)):
        return torch.save(obj, f, *args, **kwargs)
    with files.atomic_path(os.fspath(f)) as partial:
        torch.save(obj, partial, *args, **kwargs)


def weights_are_finite(model: torch.nn.Module) -> bool:
    """True when every parameter of ``model`` is finite (one device sync)."""
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def save_mid_epoch(model, optimizer, scaler, epoch: int, batches_done: int, args, state: RunState) -> str:
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
        save_checkpoint(checkpoint, path, state, batches_done=batches_done)
        logging.info(f"StarFT: saved {path} after batch {batches_done} of epoch {epoch}")
    if args.distributed:
        torch.distributed.barrier()
    return path


BEST = "best.pt"
"""The best epoch's weights under ``--starft-select`` (never a ``--resume latest`` candidate)."""


def save_best(model, best: dict, args, state: RunState) -> str:
    """``checkpoints/best.pt``: the weights after epoch ``best["epoch"]`` (epochs completed) with ``starft_best``
    (``epoch``, ``step``, ``set``, ``metric``, ``value``, ``top1``), written atomically by the master process;
    every process calls it (a barrier under torch.distributed). Returns the path."""
    path = os.path.join(args.checkpoint_path, BEST)
    if args.save_logs:
        checkpoint = {"epoch": best["epoch"], "name": args.name,
                      "state_dict": getattr(model, "_orig_mod", model).state_dict(), "starft_best": dict(best)}
        save_checkpoint(checkpoint, path, state)
        logging.info(f"StarFT: saved {path}: {best['set']} {best['metric']} {best['value']:.4f} after epoch "
                     f"{best['epoch']} (step {best['step']})")
    if args.distributed:
        torch.distributed.barrier()
    return path


def stored_position(path: str) -> tuple[int, int]:
    """(epochs completed, batches done of the next epoch) recorded in the training checkpoint at ``path``, read
    lazily (memory-mapped); raises for a file that is no readable training checkpoint."""
    checkpoint = read_checkpoint(path, mmap=True)
    return int(checkpoint["epoch"]), int((checkpoint.get("starft") or {}).get("batches_done", 0))


def training_position(path: str) -> tuple[int, int] | None:
    """(epochs completed, batches done of the next epoch) that the checkpoint at ``path`` holds: from
    its name (``epoch_E.pt``, ``epoch_E_step_K.pt``), else (``epoch_latest.pt``) from its content;
    None for other names or an unreadable file."""
    match = _NAMED.fullmatch(os.path.basename(path))
    if match:
        return int(match.group(1)), int(match.group(2) or 0)
    try:
        return stored_position(path)
    except Exception as e:  # noqa: BLE001 - a file we cannot read is no candidate; say so
        logging.warning(f"StarFT: --resume latest skips {path}: cannot read its epoch ({one_line(e)})")
        return None


def latest_checkpoint(folder: str) -> str | None:
    """The checkpoint in ``folder`` that holds the furthest training position (newest file on a tie):
    ``--resume latest``'s choice among ``epoch_latest.pt`` (``--save-most-recent``), ``epoch_N.pt``
    and ``epoch_E_step_K.pt``. Temporary (``.partial``) files are never candidates."""
    if not os.path.isdir(folder):
        return None
    candidates = []
    for name in os.listdir(folder):
        if files.PARTIAL in name or not (name == LATEST or _NAMED.fullmatch(name)):
            continue
        path = os.path.join(folder, name)
        position = training_position(path)
        if position is not None:
            candidates.append((position, os.path.getmtime(path), path))
    return max(candidates)[2] if candidates else None


def load_resume(loader, path: str, map_location="cpu"):
    """``loader(path, map_location)`` (upstream's ``pt_load``: ``torch.load`` with ``weights_only``),
    with a file it cannot read (not a checkpoint, a pickle that needs more than tensors and plain
    data, truncated or corrupt) turned into one line naming it."""
    try:
        checkpoint = loader(path, map_location=map_location)
    except FileNotFoundError:
        raise DataError(f"--resume {path}: no such file") from None
    except (Exception, MemoryError) as e:  # noqa: BLE001 - torch's unpickler fails in many ways on a bad file
        why = "it needs code to load (a crafted or foreign pickle), refused" if "weights_only" in str(e) or \
            "Unsupported global" in str(e) else f"{type(e).__name__}: {one_line(e, 120)}"
        raise DataError(f"--resume {path} is not a readable training checkpoint ({why}): pass a checkpoint "
                        "this training wrote (logs/NAME/checkpoints/epoch_N.pt) or a model state dict") from None
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise DataError(f"--resume {path} holds a {type(checkpoint).__name__}, not a training checkpoint or "
                        "model state dict")
    refuse_weights_only(checkpoint, path)
    weights = checkpoint.get("state_dict") if "epoch" in checkpoint else checkpoint
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise DataError(f"--resume {path} is neither a training checkpoint (epoch, state_dict, optimizer) nor a "
                        "model state dict (names → tensors)")
    return checkpoint


def refuse_weights_only(checkpoint: dict, path: str) -> None:
    """A one-line ``DataError`` for a checkpoint with an ``epoch`` but no optimizer state (``best.pt``): it
    holds weights only, nothing to continue training from (upstream would stop with ``KeyError: 'optimizer'``)."""
    if "epoch" not in checkpoint or "optimizer" in checkpoint:
        return
    what = ("best.pt, the epoch --starft-select kept" if "starft_best" in checkpoint
            else f"epoch {checkpoint['epoch']} without optimizer state")
    run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    raise DataError(f"--resume {path} holds weights only ({what}), not a training position to continue: score it "
                    f"with `open-clip-starft eval --run {run} --epochs best`, export it with `open-clip-starft export "
                    f"--checkpoint {path}`, or continue its run with --resume latest")


def peek_resume(path: str) -> None:
    """``refuse_weights_only`` on a ``--resume`` file, read lazily (memory-mapped, tensors not loaded), before
    anything is written; a file it cannot read this way is left to ``load_resume``."""
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except Exception:  # noqa: BLE001 - load_resume reads it again and names what is wrong
        return
    if isinstance(checkpoint, dict):
        refuse_weights_only(checkpoint, path)


def check_fits(model: torch.nn.Module, checkpoint: dict, path: str, model_name: str) -> None:
    """A ``DataError`` naming ``path`` when its weights (a training checkpoint's ``state_dict`` or a bare
    state dict; DDP's ``module.`` prefixes ignored) do not fit ``model``'s names and shapes."""
    weights = checkpoint["state_dict"] if "epoch" in checkpoint else checkpoint
    have = {k: tuple(v.shape) for k, v in strip_ddp_prefix(weights).items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    shapes = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or unexpected or shapes:
        example = (f"{shapes[0]!r} {list(have[shapes[0]])} vs {list(want[shapes[0]])}" if shapes
                   else repr((missing or unexpected)[0]))
        raise DataError(f"--resume {path} does not fit --model {model_name}: {len(missing)} weight(s) missing, "
                        f"{len(unexpected)} unexpected, {len(shapes)} of another shape (e.g. {example}): pass a "
                        "checkpoint of this architecture")
