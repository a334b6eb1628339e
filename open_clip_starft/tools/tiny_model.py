"""A tiny random-init CLIP in OpenCLIP's ``local-dir:`` format, for the demo and the tests.

Two-layer, width-64 ViT on 32-px images and a two-layer, width-64 text tower with 32 tokens
(OpenCLIP's built-in BPE tokenizer, so nothing is downloaded). One epoch over a few hundred
images takes seconds on a CPU.
"""
from __future__ import annotations

import json

import torch
from open_clip import CLIP, CustomTextCLIP

from open_clip_starft.eval.models import save_local_dir

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# The tiny SigLIP: OpenCLIP's SigLIP layout (``ViT-B-16-SigLIP``'s: a custom text tower without a causal
# mask, pooled at the last position, a learnt logit bias starting at -10 and scale at ln 10) at the tiny
# CLIP's sizes, with the built-in BPE tokenizer instead of SigLIP's Hugging Face one (nothing downloaded).
TINY_SIGLIP_CFG = {
    "embed_dim": 32, "init_logit_bias": -10, "init_logit_scale": 2.302585092994046, "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last"},
}


def build_tiny_model(seed: int = 0, image_size: int = 32, siglip: bool = False) -> tuple[CLIP | CustomTextCLIP, dict]:
    """A tiny CLIP, or with ``siglip`` a tiny SigLIP (forward returns a dict, as in training), with weights
    drawn from ``seed``, and its config."""
    cfg = json.loads(json.dumps(TINY_SIGLIP_CFG if siglip else TINY_MODEL_CFG))
    cfg["vision_cfg"]["image_size"] = image_size
    torch.manual_seed(seed)
    if siglip:
        kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
        return CustomTextCLIP(**kwargs, output_dict=True), cfg
    return CLIP(**cfg, output_dict=True), cfg


def write_tiny_model(out_dir: str, seed: int = 0, image_size: int = 32, model: CLIP | None = None,
                     siglip: bool = False) -> str:
    """Write the tiny model to ``out_dir`` as an OpenCLIP ``local-dir:`` folder (``open_clip_config.json``,
    ``open_clip_model.safetensors``, through ``eval.models.save_local_dir``); returns the ``--model``
    value (``local-dir:out_dir``). Pass ``model`` to save given weights, ``siglip`` for the tiny SigLIP."""
    built, cfg = build_tiny_model(seed, image_size, siglip)
    return save_local_dir((model if model is not None else built).state_dict(), cfg, out_dir)
