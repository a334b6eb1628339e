"""Checkpoints to evaluate: OpenCLIP models with local weights, training run folders, and WiSE-FT
weight interpolation.

A checkpoint is a model (an OpenCLIP name or ``local-dir:DIR``) and optionally a weights file (a
bare state dict, OpenCLIP's ``open_clip_pytorch_model.bin``, or a training checkpoint with
``state_dict``; OpenCLIP's ``load_checkpoint`` reads them all). A training run folder
(``--logs``/``--name``) gives ``checkpoints/epoch_N.pt`` and its model from ``params.txt``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import open_clip
import torch

from open_clip_starft.errors import StarftError


@dataclasses.dataclass
class Checkpoint:
    label: str
    model: str
    pretrained: str | None = None   # a weights file, an OpenCLIP tag, or None (the model's own weights)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "…"


def model_of_run(run_dir: str) -> str:
    """The ``--model`` a training run used, from its ``params.txt``."""
    path = os.path.join(run_dir, "params.txt")
    if not os.path.isfile(path):
        raise StarftError(f"--run {run_dir!r} has no params.txt: pass --model with the run's model")
    with open(path) as f:
        for line in f:
            if line.startswith("model: "):
                return line[len("model: "):].strip()
    raise StarftError(f"{path!r} names no model: pass --model with the run's model")


def _epoch_number(name: str) -> int | None:
    m = re.fullmatch(r"epoch_(\d+)\.pt", name)
    return int(m[1]) if m else None


def run_checkpoints(run_dir: str, epochs: str = "all") -> list[str]:
    """The epoch checkpoints of a run folder (``epoch_N.pt``; ``epoch_latest.pt`` when it has no
    other), by epoch: ``all``, ``last`` or a comma list of epochs."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(run_dir):
        raise StarftError(f"--run {run_dir!r} does not exist: give a training run folder (LOGS/NAME)")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    by_epoch = sorted((_epoch_number(n), n) for n in names if _epoch_number(n) is not None)
    if not by_epoch:
        if "epoch_latest.pt" in names:
            return [os.path.join(folder, "epoch_latest.pt")]
        raise StarftError(f"--run {run_dir!r} has no checkpoints/epoch_N.pt: check the folder (or pass --pretrained FILE)")
    if epochs == "all":
        chosen = by_epoch
    elif epochs == "last":
        chosen = by_epoch[-1:]
    else:
        try:
            wanted = {int(e) for e in epochs.split(",")}
        except ValueError:
            raise StarftError(f"--epochs {epochs!r}: use all, last or a comma list of epoch numbers") from None
        chosen = [(e, n) for e, n in by_epoch if e in wanted]
        missing = wanted - {e for e, _ in chosen}
        if missing:
            raise StarftError(f"--run {run_dir!r} has no epoch_{min(missing)}.pt (epochs: "
                              f"{', '.join(str(e) for e, _ in by_epoch)}): pick from those")
    return [os.path.join(folder, n) for _, n in chosen]


def checkpoints_from_args(model: str | None, pretrained: list[str], runs: list[str], epochs: str) -> list[Checkpoint]:
    """Checkpoints from ``--model``, ``--pretrained [LABEL=]FILE`` (repeatable) and ``--run DIR``."""
    out = []
    if pretrained and not model:
        raise StarftError("--pretrained needs --model: the architecture the weights belong to")
    for spec in pretrained:
        label, path = None, spec
        if "=" in spec and not os.path.exists(spec):
            label, path = spec.split("=", 1)
        if not os.path.exists(path) and os.sep in path:
            raise StarftError(f"--pretrained {path!r} does not exist: check the path")
        out.append(Checkpoint(label or os.path.splitext(os.path.basename(path))[0], model, path))
    for run in runs:
        run = run.rstrip("/")
        run_model = model or model_of_run(run)
        for path in run_checkpoints(run, epochs):
            out.append(Checkpoint(f"{os.path.basename(run)}/{os.path.splitext(os.path.basename(path))[0]}", run_model, path))
    if not out:
        if not model:
            raise StarftError("no checkpoint to evaluate: pass --model (with --pretrained FILE) or --run DIR")
        out.append(Checkpoint(model.removeprefix("local-dir:").rstrip("/").rsplit("/", 1)[-1] or model, model, None))
    labels = [c.label for c in out]
    for i, c in enumerate(out):  # make labels unique
        if labels.count(c.label) > 1:
            c.label = f"{c.label}#{labels[:i].count(labels[i]) + 1}"
    return out


def create_model(model: str, device="cpu", pretrained_tag: str | None = None):
    """``(model, preprocess_val, tokenizer)`` of an OpenCLIP model name or ``local-dir:``; errors as StarftError."""
    try:
        created, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained_tag, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except StarftError:
        raise
    except FileNotFoundError as e:
        raise StarftError(f"--model {model!r}: {_one_line(e)}") from None
    except RuntimeError as e:
        if "not found" in str(e) or "Unknown model" in str(e):
            raise StarftError(f"unknown --model {model!r}: use an OpenCLIP model name (open_clip.list_models()) "
                              "or local-dir:DIR") from None
        raise StarftError(f"cannot create --model {model!r} with weights {pretrained_tag!r}: {_one_line(e)}") from None
    except (ValueError, OSError) as e:
        raise StarftError(f"cannot create --model {model!r}: {_one_line(e)}") from None
    created.eval()
    return created, preprocess, tokenizer


def load_weights(model: torch.nn.Module, path: str, model_name: str) -> None:
    """Load a weights file into ``model`` with OpenCLIP's ``load_checkpoint`` (strict); a file of
    another architecture is a one-line StarftError naming both."""
    if not os.path.isfile(path):
        raise StarftError(f"checkpoint {path!r} does not exist: check the path")
    try:
        try:
            open_clip.load_checkpoint(model, path)
        except Exception as e:  # noqa: BLE001 - training checkpoints may hold non-tensor objects
            if "weights_only" not in str(e) and "Unpickl" not in type(e).__name__:
                raise
            open_clip.load_checkpoint(model, path, weights_only=False)
    except (RuntimeError, AssertionError, KeyError) as e:  # OpenCLIP's strict load / pos-embed resize
        text = str(e)
        detail = re.search(r"(size mismatch for [^:]+|Missing key\(s\)[^:]*: \S+|Unexpected key\(s\)[^:]*: \S+)", text)
        raise StarftError(f"checkpoint {path!r} is not a {model_name} checkpoint "
                          f"({(detail[1] if detail else _one_line(e)).rstrip(',')}): pass the --model it was trained with") from None
    except StarftError:
        raise
    except Exception as e:  # noqa: BLE001 - a file torch cannot read
        raise StarftError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {_one_line(e)}): "
                          "give an OpenCLIP state dict or training checkpoint") from None


class ModelCache:
    """Creates each architecture once and loads checkpoints into it."""

    def __init__(self, device="cpu"):
        self.device = device
        self._entries: dict[str, list] = {}  # model name -> [model, preprocess, tokenizer, weights loaded]

    def load(self, ckpt: Checkpoint):
        is_file = ckpt.pretrained is not None and os.path.isfile(ckpt.pretrained)
        wanted = ckpt.pretrained if ckpt.pretrained is not None else "<own>"
        entry = self._entries.get(ckpt.model)
        if entry is None or (not is_file and entry[3] != wanted):
            model, preprocess, tokenizer = create_model(ckpt.model, self.device, None if is_file else ckpt.pretrained)
            entry = self._entries[ckpt.model] = [model, preprocess, tokenizer, "<own>" if is_file else wanted]
        if is_file:
            load_weights(entry[0], ckpt.pretrained, ckpt.model)
            entry[3] = wanted
        entry[0].eval()
        return entry[0], entry[1], entry[2]


# -- WiSE-FT ----------------------------------------------------------------------------------
def interpolate_state_dicts(zero_shot: dict, fine_tuned: dict, alpha: float) -> dict:
    """θ(α) = (1−α)·θ_zero-shot + α·θ_fine-tuned for every floating tensor; α = 0 and α = 1 return
    the endpoints' tensors exactly; other tensors (integer buffers) must agree."""
    if set(zero_shot) != set(fine_tuned):
        key = sorted(set(zero_shot) ^ set(fine_tuned))[0]
        raise StarftError(f"the zero-shot and fine-tuned weights differ in parameter {key!r}: interpolate checkpoints "
                          "of one architecture")
    out = {}
    for key, a in zero_shot.items():
        b = fine_tuned[key]
        if a.shape != b.shape:
            raise StarftError(f"parameter {key!r} has shape {tuple(a.shape)} zero-shot but {tuple(b.shape)} fine-tuned: "
                              "interpolate checkpoints of one architecture")
        if alpha == 0:
            out[key] = a.clone()
        elif alpha == 1:
            out[key] = b.clone()
        elif a.is_floating_point():
            out[key] = ((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
        else:
            if not torch.equal(a, b):
                raise StarftError(f"non-float tensor {key!r} differs between the checkpoints: cannot interpolate it")
            out[key] = a.clone()
    return out


def model_config(model: str) -> dict:
    """OpenCLIP's ``open_clip_config.json`` content for a model name or ``local-dir:``."""
    if model.startswith("local-dir:"):
        with open(os.path.join(model.removeprefix("local-dir:"), "open_clip_config.json")) as f:
            return json.load(f)
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise StarftError(f"unknown --model {model!r}: use an OpenCLIP model name or local-dir:DIR")
    return {"model_cfg": cfg, "preprocess_cfg": {}}


def save_openclip(state_dict: dict, model: str, path: str) -> str:
    """Save weights in OpenCLIP's format: a ``.pt``/``.bin`` state dict file (for ``--model NAME
    --pretrained FILE``), or, for any other path, a ``local-dir:`` folder with
    ``open_clip_config.json`` and ``open_clip_pytorch_model.bin``. Returns what to pass as --model
    (folder) or --pretrained (file)."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.endswith((".pt", ".bin", ".pth")):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(state_dict, path + ".partial")
        os.replace(path + ".partial", path)
        return path
    os.makedirs(path, exist_ok=True)
    if model.startswith("local-dir:"):
        src = model.removeprefix("local-dir:")
        for name in os.listdir(src):  # config and tokenizer files travel with the weights
            if not name.endswith((".bin", ".pt", ".pth", ".safetensors")) and os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(path, name))
    else:
        with open(os.path.join(path, "open_clip_config.json"), "w") as f:
            json.dump(model_config(model), f, indent=2)
    torch.save(state_dict, os.path.join(path, "open_clip_pytorch_model.bin"))
    return f"local-dir:{path}"
