"""Checkpoints to evaluate: OpenCLIP models with local weights, training run folders, and WiSE-FT
weight interpolation.

A checkpoint is a model (an OpenCLIP name or ``local-dir:DIR``) and optionally a weights file (a
bare state dict, OpenCLIP's ``open_clip_pytorch_model.bin``, or a training checkpoint with
``state_dict``; OpenCLIP's ``load_checkpoint`` reads them all). A training run folder
(``--logs``/``--name``) gives ``checkpoints/epoch_N.pt`` and its model from ``params.txt``.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from open_clip_starft.data import files
from open_clip_starft.data.weights import CORRUPT, read_checkpoint, refusal, strip_ddp_prefix
from open_clip_starft.errors import ConfigError, DataError, StarftError, UntrustedCheckpoint, one_line, with_flag
from open_clip_starft.eval.precision import EVAL_PRECISIONS

CONFIG_FILE = HF_CONFIG_NAME            # open_clip_config.json
WEIGHTS_FILE = HF_SAFE_WEIGHTS_NAME     # open_clip_model.safetensors, the name OpenCLIP's Hub upload and loader prefer
_OTHER_WEIGHTS = ("open_clip_pytorch_model.safetensors", HF_WEIGHTS_NAME, "open_clip_pytorch_model.pth")
_NOT_COPIED = (CONFIG_FILE, "README.md")


@dataclasses.dataclass
class Checkpoint:
    label: str
    model: str
    pretrained: str | None = None   # a weights file, an OpenCLIP tag, or None (the model's own weights)
    precision: str | None = None    # the precision its run trained at (--run), else None
    run: str | None = None          # the run folder it belongs to (--run), else None


def run_precision(run_dir: str) -> str | None:
    """The precision a training run used, as an ``EVAL_PRECISIONS`` value (upstream's ``amp_bfloat16`` is
    ``amp_bf16``), from its ``params.txt``; None when it has none (or an empty one), records none, or records
    one eval cannot run (pure fp16/bf16)."""
    path = os.path.join(run_dir, "params.txt")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    precision = str(read_params(path).get("precision", "") or "")
    precision = {"amp_bfloat16": "amp_bf16"}.get(precision, precision)
    return precision if precision in EVAL_PRECISIONS else None


def local_dir_weights(model: str) -> str | None:
    """The weights file OpenCLIP loads for a ``local-dir:`` model (its own choice: preferred names, then
    ``.safetensors`` before ``.bin``/``.pth``); None when the folder has none (OpenCLIP then builds
    random weights, with only a warning)."""
    from open_clip.factory import _find_checkpoint_in_dir
    folder = model.removeprefix("local-dir:")
    return _find_checkpoint_in_dir(Path(folder)) if os.path.isdir(folder) else None


def read_params(path: str) -> dict:
    """``params.txt`` of an OpenCLIP run (``name: value`` lines) as values (Python literals where they
    parse). A missing or empty file (a write cut short) is a one-line DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: the run folder has no params.txt (name the model explicitly)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes: a write was cut short, e.g. a full disk): name the model "
                        "explicitly, or rewrite params.txt from the run's out.log")
    params = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            name, sep, raw = line.rstrip("\n").partition(": ")
            if not sep:
                continue
            try:
                params[name] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                params[name] = raw
    return params


def model_of_run(run_dir: str) -> str:
    """The ``--model`` a training run used, from its ``params.txt``."""
    path = os.path.join(run_dir, "params.txt")
    if not os.path.isfile(path):
        raise StarftError(f"--run {run_dir!r} has no params.txt: pass --model with the run's model")
    model = read_params(path).get("model")
    if not model:
        raise StarftError(f"{path!r} names no model: pass --model with the run's model")
    return str(model)


def _epoch_number(name: str) -> int | None:
    m = re.fullmatch(r"epoch_(\d+)\.pt", name)
    return int(m[1]) if m else None


def run_checkpoints(run_dir: str, epochs: str = "all") -> list[str]:
    """The epoch checkpoints of a run folder (``epoch_N.pt``; ``epoch_latest.pt`` when it has no
    other), by epoch: ``all``, ``last``, ``best`` (``best.pt``, the epoch ``--starft-select`` kept) or a
    comma list of epochs."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(run_dir):
        raise StarftError(f"--run {run_dir!r} does not exist: give a training run folder (LOGS/NAME)")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if epochs == "best":
        if "best.pt" not in names:
            raise StarftError(f"--run {run_dir!r} has no checkpoints/best.pt: train with --starft-val NAME=ROOT "
                              "--starft-select NAME:METRIC, or pick epochs (all, last, N,M)")
        return [os.path.join(folder, "best.pt")]
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
            raise StarftError(f"--epochs {epochs!r}: use all, last, best or a comma list of epoch numbers") from None
        chosen = [(e, n) for e, n in by_epoch if e in wanted]
        missing = wanted - {e for e, _ in chosen}
        if missing:
            raise StarftError(f"--run {run_dir!r} has no epoch_{min(missing)}.pt (epochs: "
                              f"{', '.join(str(e) for e, _ in by_epoch)}): pick from those")
    return [os.path.join(folder, n) for _, n in chosen]


def check_weights_value(value: str, model: str) -> None:
    """``value`` names weights of ``model``: an existing file, or, for a plain OpenCLIP model name, a
    pretrained tag OpenCLIP knows for it (``open_clip.list_pretrained_tags_by_model``). Anything else is
    a one-line ConfigError (OpenCLIP would ignore an unknown tag of a ``local-dir:`` model and evaluate
    its own weights under the given label)."""
    if os.path.isfile(value):
        return
    if os.path.exists(value):
        raise ConfigError(f"{value!r} is a folder, not a weights file: give the checkpoint file in it")
    tags = [] if model.startswith(("local-dir:", "hf-hub:")) else open_clip.list_pretrained_tags_by_model(model)
    if value in tags:
        return
    if tags:
        raise ConfigError(f"{value!r} is neither an existing file nor a pretrained tag of {model} "
                          f"(tags: {', '.join(tags)}): check the path (relative to {os.getcwd()}) or the tag")
    raise ConfigError(f"checkpoint {value!r} does not exist (relative to {os.getcwd()}), and {model} takes "
                      "weights only from files: check the path")


def checkpoints_from_args(model: str | None, pretrained: list[str], runs: list[str], epochs: str) -> list[Checkpoint]:
    """Checkpoints from ``--model``, ``--pretrained [LABEL=]FILE|TAG`` (repeatable) and ``--run DIR``."""
    out = []
    if pretrained and not model:
        raise StarftError("--pretrained needs --model: the architecture the weights belong to")
    for spec in pretrained:
        label, path = None, spec
        if "=" in spec and not os.path.exists(spec):
            label, path = spec.split("=", 1)
        try:
            check_weights_value(path, model)
        except StarftError as e:
            raise with_flag(e, "--pretrained") from None
        out.append(Checkpoint(label or os.path.splitext(os.path.basename(path))[0], model, path))
    for run in runs:
        run = run.rstrip("/")
        run_model = model or model_of_run(run)
        for path in run_checkpoints(run, epochs):
            out.append(Checkpoint(f"{os.path.basename(run)}/{os.path.splitext(os.path.basename(path))[0]}", run_model, path,
                                  run_precision(run), run))
    if not out:
        if not model:
            raise StarftError("no checkpoint to evaluate: pass --model (with --pretrained FILE) or --run DIR")
        out.append(Checkpoint(model.removeprefix("local-dir:").rstrip("/").rsplit("/", 1)[-1] or model, model, None))
    labels = [c.label for c in out]
    for i, c in enumerate(out):  # make labels unique
        if labels.count(c.label) > 1:
            c.label = f"{c.label}#{labels[:i].count(labels[i]) + 1}"
    return out


class _DropRecords(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes`` (OpenCLIP's notes about weights
    that this package loads itself)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``: the ``--device`` default of every command that runs models."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def create_model(model: str, device="cpu", pretrained_tag: str | None = None, trust: bool = False, own_weights: bool = True):
    """``(model, preprocess_val, tokenizer)`` of an OpenCLIP model name or ``local-dir:``; errors as StarftError.

    A ``local-dir:`` folder's own weights file is read by ``read_checkpoint`` (``trust``: see there), not by
    OpenCLIP's loader; ``own_weights=False`` leaves them out (the caller loads other weights)."""
    weights = local_dir_weights(model) if model.startswith("local-dir:") else None
    skip = {"load_weights": False, "pretrained_text": False} if weights else {}
    quiet = _DropRecords("No pretrained weights loaded", "Potential checkpoint path")  # we load them just after
    if weights:
        logging.getLogger().addFilter(quiet)
    try:
        created, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained_tag, device=device, **skip)
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
    except pickle.UnpicklingError as e:  # OpenCLIP reads a tag's downloaded weights with weights_only=True
        raise refusal(f"{pretrained_tag} of --model {model}", e) from None
    except (ValueError, OSError) as e:
        raise StarftError(f"cannot create --model {model!r}: {one_line(e)}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    if pretrained_tag:  # weights OpenCLIP loaded itself (a pretrained tag)
        check_finite(created.state_dict(), f"the {pretrained_tag} weights of --model {model}")
    if weights and own_weights:
        load_weights(created, weights, model, trust=trust)
    created.eval()
    return created, preprocess, tokenizer


# -- reading checkpoints (data.weights: the one reader and normaliser) --------------------------------
def checkpoint_state(path: str, trust: bool = False) -> tuple[dict, dict]:
    """``(state dict without DDP's "module." prefix, the checkpoint's other entries: epoch, name,
    starft, ...)`` of a weights file (see ``read_checkpoint``), as OpenCLIP's ``load_state_dict`` takes
    them: a training checkpoint's ``state_dict``, a bare state dict, a TorchScript model's weights.
    The one reader of weights files (eval, wise, sweep, export): weights holding NaN or ±Inf are a
    one-line DataError naming the file and the first bad tensor (``check_finite``)."""
    raw = read_checkpoint(path, trust)
    meta = {}
    if isinstance(raw, torch.jit.ScriptModule):  # only with trust
        raw = {k: v for k, v in raw.state_dict().items() if k not in ("input_resolution", "context_length", "vocab_size")}
    elif isinstance(raw, dict) and "state_dict" in raw:
        meta = {k: v for k, v in raw.items() if k != "state_dict"}
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise DataError(f"checkpoint {path} holds no state dict (name -> tensor): give OpenCLIP weights or a "
                        "training checkpoint")
    raw = strip_ddp_prefix(raw)
    check_finite(raw, f"checkpoint {path}")
    return raw, meta


def first_non_finite(tensors) -> tuple[str, str, int] | None:
    """``(name, "NaN" or "Inf", how many tensors hold either)`` of the first floating tensor of
    ``tensors`` (name -> tensor, in order) holding a NaN or ±Inf; None when all are finite."""
    bad = [(name, v) for name, v in tensors.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return None
    name, v = bad[0]
    return name, "NaN" if bool(torch.isnan(v).any()) else "Inf", len(bad)


def check_finite(tensors, where: str) -> None:
    """Refuse weights holding NaN or ±Inf (a diverged run or a damaged file: they would be scored, interpolated
    or exported as if they were a model) in one line naming ``where`` and the first bad tensor."""
    found = first_non_finite(tensors)
    if found is not None:
        name, kind, count = found
        raise DataError(f"{where} holds non-finite weights ({kind} in {name!r}"
                        + (f", and {count - 1} more tensor(s)" if count > 1 else "") + "): the training diverged or "
                        "the file is damaged; use an earlier checkpoint")


_LOAD_ERROR = re.compile(r"(size mismatch for [^:]+|Missing key\(s\)[^:]*: \S+|Unexpected key\(s\)[^:]*: \S+)")


def load_error_detail(error: BaseException) -> str:
    """The first size mismatch / missing / unexpected key of a failed strict ``load_state_dict``."""
    detail = _LOAD_ERROR.search(str(error))
    return (detail[1] if detail else one_line(error)).rstrip(",.")


def _image_size(state: dict, model: torch.nn.Module) -> tuple[int | None, int | None]:
    """``(the checkpoint's image size, the model's)`` from the ViT position embeddings (tokens = grid² + 1
    class token; size = grid × patch size); ``(None, None)`` when they agree or the tower has none."""
    key = "visual.positional_embedding"
    mine = model.state_dict().get(key)
    if key not in state or mine is None or state[key].ndim != 2 or state[key].shape[0] == mine.shape[0]:
        return None, None  # same number of tokens (a width difference is another architecture's, named on load)
    patch = getattr(model.visual, "patch_size", (1,))
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    grid = lambda n: round((n - 1) ** 0.5) * patch  # noqa: E731
    return grid(state[key].shape[0]), grid(mine.shape[0])


def load_state(model: torch.nn.Module, state: dict, resize: bool = True) -> None:
    """``state`` into ``model`` as OpenCLIP's ``load_checkpoint`` does after reading its file (third-party
    key conversion, the old text-tower layout, logit scale/bias shapes, position-embedding resize),
    strict. With ``resize=False`` position embeddings of another image size raise instead of being
    interpolated (a ``ConfigError`` naming both sizes)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        mine = getattr(model, key, None)
        if key in state and mine is not None and state[key].ndim != mine.ndim:
            state[key] = state[key].reshape(mine.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    if not hasattr(model, "text.transformer.embeddings.position_ids"):
        state.pop("text.transformer.embeddings.position_ids", None)
    theirs, ours = _image_size(state, model)
    if theirs is not None and not resize:
        raise ConfigError(f"the weights are for {theirs}-px images but the model takes {ours}-px images: "
                          "their position embeddings would be resized; use weights of one image size")
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def load_weights(model: torch.nn.Module, path: str, model_name: str, trust: bool = False, resize: bool = True) -> None:
    """Load a weights file (see ``read_checkpoint``: never unpickled beyond weights unless ``trust``) into
    ``model``, strict; a file of another architecture is a one-line DataError naming both; ``resize``:
    see ``load_state``."""
    if str(path).endswith((".npz", ".npy")):  # big_vision (SigLIP) weights: numpy without pickles
        try:
            open_clip.load_checkpoint(model, path)
        except (*CORRUPT, AssertionError) as e:
            raise DataError(f"checkpoint {path!r} is not a {model_name} checkpoint ({one_line(e)}): pass the --model "
                            "it was trained with") from None
        check_finite(model.state_dict(), f"checkpoint {path}")
        return
    state, _ = checkpoint_state(path, trust)
    try:
        load_state(model, state, resize)
    except ConfigError as e:
        raise ConfigError(f"checkpoint {path}: {e}") from None
    except (RuntimeError, AssertionError, KeyError, ValueError) as e:  # OpenCLIP's strict load / pos-embed resize
        raise DataError(f"checkpoint {path!r} is not a {model_name} checkpoint ({load_error_detail(e)}): "
                        "pass the --model it was trained with") from None


class ModelCache:
    """Creates each architecture once and loads checkpoints into it (``trust``: see ``read_checkpoint``)."""

    def __init__(self, device="cpu", trust: bool = False):
        self.device = device
        self.trust = trust
        self._entries: dict[str, list] = {}  # model name -> [model, preprocess, tokenizer, weights loaded]

    def load(self, ckpt: Checkpoint):
        is_file = ckpt.pretrained is not None and os.path.isfile(ckpt.pretrained)
        wanted = ckpt.pretrained if ckpt.pretrained is not None else "<own>"
        entry = self._entries.get(ckpt.model)
        if entry is None or (not is_file and entry[3] != wanted):
            if not is_file and ckpt.pretrained is None and ckpt.model.startswith("local-dir:") and not local_dir_weights(ckpt.model):
                raise StarftError(f"--model {ckpt.model!r} holds no weights file (OpenCLIP would evaluate random weights): "
                                  "pass --pretrained FILE, or save the model's weights in the folder")
            if not is_file and ckpt.pretrained is not None:
                check_weights_value(ckpt.pretrained, ckpt.model)
            model, preprocess, tokenizer = create_model(ckpt.model, self.device, None if is_file else ckpt.pretrained,
                                                        trust=self.trust, own_weights=not is_file)
            entry = self._entries[ckpt.model] = [model, preprocess, tokenizer, "<own>" if is_file else wanted]
        if is_file:
            load_weights(entry[0], ckpt.pretrained, ckpt.model, trust=self.trust)
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
    with tempfile.TemporaryDirectory() as tmp:  # a scratch folder, removed at once: not a user's file
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
            if (os.path.isfile(path) and name not in _NOT_COPIED and files.PARTIAL not in name
                    and not name.endswith((".bin", ".pt", ".pth", ".safetensors"))):
                with files.atomic_path(os.path.join(out_dir, name)) as partial:
                    shutil.copyfile(path, partial)
        return
    hf_name = config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_name and os.path.isdir(hf_name) and os.path.samefile(hf_name, out_dir):
        return  # the tokenizer files are in the folder already
    if hf_name:  # a local-dir model always reads an HF tokenizer from its own folder
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(hf_name, local_files_only=True)
            with tempfile.TemporaryDirectory() as tmp:  # its files, each then written atomically
                tokenizer.save_pretrained(tmp)
                for name in os.listdir(tmp):
                    with files.atomic_path(os.path.join(out_dir, name)) as partial:
                        shutil.copyfile(os.path.join(tmp, name), partial)
        except StarftError:
            raise
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
            raise DataError(f"the weights are not those of {source} ({load_error_detail(e)}): "
                            "pass the model they were trained with") from None
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with files.atomic_path(os.path.join(out_dir, WEIGHTS_FILE)) as partial:
        try:
            save_file(tensors, partial)
        except RuntimeError:  # tensors sharing memory (tied weights): safetensors wants separate copies
            save_file({k: v.clone() for k, v in tensors.items()}, partial)
    for name in _OTHER_WEIGHTS:  # an earlier save's weights would confuse OpenCLIP's and the Hub's loaders
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    _copy_tokenizer(source if isinstance(model_cfg_or_name, str) else "", config, out_dir)
    _write_config(model, config, out_dir)
    return f"local-dir:{out_dir}"


def _write_config(model: torch.nn.Module, config: dict, out_dir: str) -> None:
    """``open_clip_config.json`` as OpenCLIP's ``save_config_for_hf`` writes it, with ``config``'s
    preprocessing settings added, written atomically."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    with tempfile.TemporaryDirectory() as tmp:  # OpenCLIP's writer opens the path itself: a scratch copy first
        save_config_for_hf(model, Path(tmp) / CONFIG_FILE, model_config=config["model_cfg"])
        with open(os.path.join(tmp, CONFIG_FILE), encoding="utf-8") as f:
            written = json.load(f)
    written["preprocess_cfg"] = {**config["preprocess_cfg"], **written["preprocess_cfg"]}
    files.write_json(os.path.join(out_dir, CONFIG_FILE), written, indent=2)


def save_openclip(state_dict: dict, model: str, path: str) -> str:
    """Save weights for OpenCLIP: a ``.pt``/``.bin``/``.pth`` path gets a bare state dict (for
    ``--model NAME --pretrained FILE``); any other path becomes a ``local-dir:`` folder
    (``save_local_dir``). Returns what to pass as --pretrained (file) or --model (folder)."""
    if not path.endswith((".pt", ".bin", ".pth")):
        return save_local_dir(state_dict, model, path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_path(path) as partial:
        torch.save(state_dict, partial)
    return path
