"""Weights files: the one checkpoint reader (``read_checkpoint``: safetensors, or ``torch.load`` with
``weights_only=True``; never a user's pickle unless they trust it) and the one state-dict normaliser
(``strip_ddp_prefix``: DDP's ``module.`` prefixes dropped). Here, in ``data``, because both ``eval``
(checkpoints to score, export) and ``host`` (the teacher, ``--resume`` checks, ``--resume latest``) read
weights files; ``tests/test_layout.py`` checks that no other module calls ``torch.load`` or strips the prefix.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile

import torch

from open_clip_starft.errors import DataError, UntrustedCheckpoint, one_line

DDP_PREFIX = "module."
"""What ``DistributedDataParallel`` puts before every name of the module it wraps."""


def strip_ddp_prefix(state_dict: dict) -> dict:
    """``state_dict`` (names → tensors) with DDP's ``module.`` prefix dropped from every name that has it."""
    return {k.removeprefix(DDP_PREFIX): v for k, v in state_dict.items()}


SAFE_GLOBALS: tuple = ()
"""Globals allowed beyond torch's weights-only defaults when unpickling a checkpoint. Our training
checkpoints (``state_dict``, ``optimizer``, ``scaler``, ``epoch``, ``name``, ``starft``: tensors,
dicts, lists, numbers, strings) and OpenCLIP's released weights (bare state dicts) need none
(``tests/test_security.py`` loads both)."""

CORRUPT = (RuntimeError, EOFError, MemoryError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, zipfile.BadZipFile, pickle.UnpicklingError, UnicodeDecodeError)


def refusal(path: str, error: BaseException) -> DataError:
    """The one-line error for a checkpoint torch's weights-only unpickler refused or could not read."""
    text = str(error)
    refused = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", text)
    if refused:
        return UntrustedCheckpoint(f"checkpoint {path} was refused: loading it would call {refused[1]}, which is "
                                   "not a weights type and can run code (a crafted file, or objects that are not "
                                   "weights): load only files you made yourself, and trust them explicitly")
    if "TorchScript" in text:
        return UntrustedCheckpoint(f"checkpoint {path} was refused: it is a TorchScript archive (code, not only "
                                   "weights): use the OpenCLIP pretrained tag of these weights, or trust the file "
                                   "explicitly if you made it yourself")
    detail = re.search(r"(Unsupported operand \d+|failed finding central directory|[^.\n]*(?:truncated|corrupt)[^.\n]*)", text)
    return DataError(f"cannot read checkpoint {path} ({type(error).__name__}: {detail[1] if detail else one_line(text, 120)}): "
                     "the file is truncated, corrupt or not a PyTorch/safetensors weights file: use another copy")


def read_checkpoint(path: str, trust: bool = False, mmap: bool = False):
    """What a weights file holds (a state dict, a training checkpoint dict, OpenCLIP's released weights),
    read without running code from it: ``.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True)`` with ``SAFE_GLOBALS``. ``trust=True`` (for the user's own files
    only) allows any pickle (``weights_only=False``); ``mmap``: tensors mapped from the file, not read. A
    refused file is an ``UntrustedCheckpoint`` naming the global it needed; a missing, empty, truncated or
    corrupt file is a one-line DataError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} does not exist: check the path")
    if os.path.getsize(path) == 0:
        raise DataError(f"checkpoint {path} is empty (0 bytes: a save cut short?): use another checkpoint")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, *CORRUPT) as e:
            raise refusal(path, e) from None
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except CORRUPT as e:
        raise refusal(path, e) from None
    except Exception as e:  # noqa: BLE001 - torch's readers (and a trusted pickle while it runs) raise many kinds
        raise DataError(f"cannot read checkpoint {path} ({type(e).__name__}: {one_line(e, 120)}): "
                        "use another copy") from None
