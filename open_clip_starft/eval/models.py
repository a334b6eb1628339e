"""Checkpoints to evaluate: OpenCLIP models with local weights, training run folders, and WiSE-FT
weight interpolation.

A checkpoint is a model (an OpenCLIP name or ``local-dir:DIR``) and optionally a weights file (a
bare state dict, OpenCLIP's ``open_clip_pytorch_model.bin``, or a training checkpoint with
``state_dict``; OpenCLIP's ``load_checkpoint`` reads them all). A training run folder
(``--logs``/``--name``) gives ``checkpoints/epoch_N.pt`` and its model from ``params.txt``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from open_clip_starft.errors import StarftError, one_line

CONFIG_FILE = HF_CONFIG_NAME            # open_clip_config.json
WEIGHTS_FILE = HF_SAFE_WEIGHTS_NAME     # open_clip_model.safetensors, the name OpenCLIP's Hub upload and loader prefer
_OTHER_WEIGHTS = ("open_clip_pytorch_model.safetensors", HF_WEIGHTS_NAME, "open_clip_pytorch_model.pth")
_NOT_COPIED = (CONFIG_FILE, "README.md")


@dataclasses.dataclass
class Checkpoint:
    label: str
    model: str
    pretrained: str | None = None   # a weights file, an OpenCLIP tag, or None (the model's own weights)


def local_dir_weights(model: str) -> str | None:
    """The weights file OpenCLIP loads for a ``local-dir:`` model (its preferred names first, then any
    ``.safetensors``, ``.bin`` or ``.pth``); None when the folder has none (OpenCLIP then builds
    random weights, with only a warning)."""
    folder = model.removeprefix("local-dir:")
    names = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".pth"))) if os.path.isdir(folder) else []
    for name in (WEIGHTS_FILE, *_OTHER_WEIGHTS, *sorted(names, key=lambda n: not n.endswith(".safetensors"))):
        if name in names and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


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
        raise StarftError(f"--model {model!r}: {one_line(e)}") from None
    except RuntimeError as e:
        if "not found" in str(e) or "Unknown model" in str(e):
            raise StarftError(f"unknown --model {model!r}: use an OpenCLIP model name (open_clip.list_models()) "
                              "or local-dir:DIR") from None
        raise StarftError(f"cannot create --model {model!r} with weights {pretrained_tag!r}: {one_line(e)}") from None
    except (ValueError, OSError) as e:
        raise StarftError(f"cannot create --model {model!r}: {one_line(e)}") from None
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
                          f"({(detail[1] if detail else one_line(e)).rstrip(',')}): pass the --model it was trained with") from None
    except StarftError:
        raise
    except Exception as e:  # noqa: BLE001 - a file torch cannot read
        raise StarftError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {one_line(e)}): "
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
            if not is_file and ckpt.pretrained is None and ckpt.model.startswith("local-dir:") and not local_dir_weights(ckpt.model):
                raise StarftError(f"--model {ckpt.model!r} holds no weights file (OpenCLIP would evaluate random weights): "
                                  "pass --pretrained FILE, or save the model's weights in the folder")
            model, preprocess, tokenizer = create_model(ckpt.model, self.device, None if is_file else ckpt.pretrained)
            entry = self._entries[ckpt.model] = [model, preprocess, tokenizer, "<own>" if is_file else wanted]
        if is_file:
            load_weights(entry[0], ckpt.pretrained, ckpt.model)
            entry[3] = wanted
        entry[0].eval()
        return entry[0], entry[1], entry[2]


# -- WiSE-FT ----------------------------------------------------------------------------------
def interpolate_state_dicts(zero_shot: dict, fine_tuned: dict, alpha: float) -> dict:
    """θ(α) = (1−α)·θ_zero-shot + α·θ_fine-tuned for every floating tensor (BatchNorm's running statistics
    included, as WiSE-FT does); α = 0 and α = 1 return the endpoints' tensors exactly. Other tensors (integer
    buffers) must agree, except BatchNorm's ``num_batches_tracked`` step counter, which only feeds the running
    averages in training mode (momentum None) and is taken from the nearer endpoint."""
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
        elif key.endswith("num_batches_tracked"):
            out[key] = (a if alpha < 0.5 else b).clone()
        else:
            if not torch.equal(a, b):
                raise StarftError(f"non-float tensor {key!r} differs between the checkpoints: cannot interpolate it")
            out[key] = a.clone()
    return out


def model_config(model: str) -> dict:
    """OpenCLIP's ``open_clip_config.json`` content (``model_cfg``, ``preprocess_cfg``) for a model
    name or ``local-dir:``."""
    if model.startswith("local-dir:"):
        path = os.path.join(model.removeprefix("local-dir:"), CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise StarftError(f"--model {model!r}: cannot read {path!r} ({one_line(e)}): give an OpenCLIP local-dir folder") from None
        if "model_cfg" not in config:
            raise StarftError(f"--model {model!r}: {path!r} has no 'model_cfg': give an OpenCLIP local-dir folder")
        return {"model_cfg": config["model_cfg"], "preprocess_cfg": dict(config.get("preprocess_cfg") or {})}
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise StarftError(f"unknown --model {model!r}: use an OpenCLIP model name or local-dir:DIR")
    return {"model_cfg": cfg, "preprocess_cfg": {}}


def _model_from_config(config: dict, where: str) -> torch.nn.Module:
    """An OpenCLIP model built from ``config`` (through a ``local-dir:`` folder holding only the
    config, so OpenCLIP builds it as it will load it), without any weights."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f)
        logging.disable(logging.WARNING)  # OpenCLIP warns that the folder has no weights: none are wanted
        try:
            return open_clip.create_model(f"local-dir:{tmp}", load_weights=False, pretrained_text=False)
        except Exception as e:  # noqa: BLE001 - OpenCLIP raises many kinds for a bad config
            raise StarftError(f"cannot build the model of {where} ({type(e).__name__}: {one_line(e)}): check its config") from None
        finally:
            logging.disable(logging.NOTSET)


def _copy_tokenizer(source: str, config: dict, out_dir: str) -> None:
    """What a ``local-dir:`` model needs besides config and weights: every other file of a
    ``local-dir:`` source (tokenizer and HF text-tower files), or, for a model name whose text tower
    uses a Hugging Face tokenizer, that tokenizer's files from the local Hugging Face cache."""
    if source.startswith("local-dir:"):
        src = source.removeprefix("local-dir:")
        if os.path.abspath(src) == os.path.abspath(out_dir):
            return
        for name in os.listdir(src):
            path = os.path.join(src, name)
            if os.path.isfile(path) and name not in _NOT_COPIED and not name.endswith((".bin", ".pt", ".pth", ".safetensors")):
                shutil.copy(path, os.path.join(out_dir, name))
        return
    hf_name = config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_name and os.path.isdir(hf_name) and os.path.samefile(hf_name, out_dir):
        return  # the tokenizer files are in the folder already
    if hf_name:  # a local-dir model always reads an HF tokenizer from its own folder
        try:
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(hf_name, local_files_only=True).save_pretrained(out_dir)
        except Exception as e:  # noqa: BLE001 - missing from the cache, or transformers absent
            raise StarftError(f"--model {source!r} uses the Hugging Face tokenizer {hf_name!r}, which is not in the local "
                              f"cache ({type(e).__name__}: {one_line(e)}): save it there first, or pass --model local-dir:DIR "
                              "of a folder that holds it") from None


def save_local_dir(state_dict_or_model, model_cfg_or_name, out_dir: str, *, preprocess_cfg: dict | None = None,
                   tokenizer_cfg: dict | None = None, model_cfg_updates: dict | None = None) -> str:
    """Save weights as an OpenCLIP ``local-dir:`` folder in the layout OpenCLIP's Hugging Face Hub
    upload writes (``open_clip.push_to_hf_hub.save_for_hf``), so ``huggingface-cli upload`` takes
    the folder as it is; nothing here touches the network.

    ``state_dict_or_model``: a state dict (checked against the architecture: a strict load into
    the model built from the config) or a model. ``model_cfg_or_name``: an OpenCLIP model name,
    ``local-dir:DIR`` (its config, preprocessing and tokenizer files are carried over) or a
    ``model_cfg`` dict. ``preprocess_cfg`` overrides preprocessing settings (``mean``, ``std``,
    ``interpolation``, ``resize_mode``); ``tokenizer_cfg`` overrides the tokenizer settings of
    ``model_cfg["text_cfg"]`` (``hf_tokenizer_name``, ``tokenizer_kwargs``, ``context_length``);
    ``model_cfg_updates`` changes the source's ``model_cfg`` (``vision_cfg``/``text_cfg`` merged key
    by key), e.g. what a training run's ``--force-quick-gelu``/``--force-image-size`` changed.

    Writes ``open_clip_model.safetensors``, the tokenizer files a Hugging Face tokenizer needs
    (OpenCLIP's built-in BPE tokenizer needs none: without ``hf_tokenizer_name`` OpenCLIP uses it
    with ``text_cfg``'s context length), then ``open_clip_config.json`` (``model_cfg`` and
    ``preprocess_cfg`` as ``save_config_for_hf`` writes them) last, each under a temporary name
    first: a folder with a config always has its weights. Returns ``"local-dir:OUT_DIR"``."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file
    if isinstance(model_cfg_or_name, dict):
        source, config = "the given model_cfg", {"model_cfg": copy.deepcopy(model_cfg_or_name), "preprocess_cfg": {}}
    else:
        source, config = model_cfg_or_name, copy.deepcopy(model_config(model_cfg_or_name))
    for key, value in (model_cfg_updates or {}).items():
        if isinstance(value, dict) and isinstance(config["model_cfg"].get(key), dict):
            config["model_cfg"][key].update(value)
        else:
            config["model_cfg"][key] = value
    if tokenizer_cfg:
        config["model_cfg"].setdefault("text_cfg", {}).update(tokenizer_cfg)
    config["preprocess_cfg"].update(preprocess_cfg or {})
    if isinstance(state_dict_or_model, torch.nn.Module):
        model = state_dict_or_model
    else:
        model = _model_from_config(config, source)
        try:
            model.load_state_dict(state_dict_or_model, strict=True)
        except RuntimeError as e:
            detail = re.search(r"(size mismatch for [^:]+|Missing key\(s\)[^:]*: \S+|Unexpected key\(s\)[^:]*: \S+)", str(e))
            raise StarftError(f"the weights are not those of {source} ({(detail[1] if detail else one_line(e)).rstrip(',.')}): "
                              "pass the model they were trained with") from None
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    try:
        save_file(tensors, weights + ".partial")
    except RuntimeError:  # tensors sharing memory (tied weights): safetensors wants separate copies
        save_file({k: v.clone() for k, v in tensors.items()}, weights + ".partial")
    os.replace(weights + ".partial", weights)
    for name in _OTHER_WEIGHTS:  # an earlier save's weights would confuse OpenCLIP's and the Hub's loaders
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    _copy_tokenizer(source if isinstance(model_cfg_or_name, str) else "", config, out_dir)
    partial = Path(out_dir) / (CONFIG_FILE + ".partial")
    save_config_for_hf(model, partial, model_config=config["model_cfg"])
    with open(partial, encoding="utf-8") as f:
        written = json.load(f)
    written["preprocess_cfg"] = {**config["preprocess_cfg"], **written["preprocess_cfg"]}
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(written, f, indent=2)
    os.replace(partial, os.path.join(out_dir, CONFIG_FILE))
    return f"local-dir:{out_dir}"


def save_openclip(state_dict: dict, model: str, path: str) -> str:
    """Save weights for OpenCLIP: a ``.pt``/``.bin``/``.pth`` path gets a bare state dict (for
    ``--model NAME --pretrained FILE``); any other path becomes a ``local-dir:`` folder
    (``save_local_dir``). Returns what to pass as --pretrained (file) or --model (folder)."""
    if not path.endswith((".pt", ".bin", ".pth")):
        return save_local_dir(state_dict, model, path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state_dict, path + ".partial")
    os.replace(path + ".partial", path)
    return path
