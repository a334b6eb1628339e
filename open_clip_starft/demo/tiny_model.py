"""A tiny random-init CLIP in OpenCLIP's ``local-dir:`` format, for the demo and the tests.

Two-layer, width-64 ViT on 32-px images and a two-layer, width-64 text tower with 32 tokens
(OpenCLIP's built-in BPE tokenizer, so nothing is downloaded). One epoch over a few hundred
images takes seconds on a CPU.
"""
from __future__ import annotations

import json
import os

import torch
from open_clip import CLIP

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_model(seed: int = 0, image_size: int = 32) -> tuple[CLIP, dict]:
    """A tiny CLIP (forward returns a dict, as in training) with weights drawn from ``seed``, and its config."""
    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    cfg["vision_cfg"]["image_size"] = image_size
    torch.manual_seed(seed)
    return CLIP(**cfg, output_dict=True), cfg


def write_tiny_model(out_dir: str, seed: int = 0, image_size: int = 32, model: CLIP | None = None) -> str:
    """Write ``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` to ``out_dir``;
    returns the ``--model`` value (``local-dir:out_dir``). Pass ``model`` to save given weights."""
    built, cfg = build_tiny_model(seed, image_size)
    model = model if model is not None else built
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f, indent=2)
    torch.save(model.state_dict(), os.path.join(out_dir, "open_clip_pytorch_model.bin"))
    return f"local-dir:{out_dir}"
