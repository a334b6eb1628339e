"""CLIP-lite v3's pre-training, LiT style with both towers locked: only the two projections (and the logit
scale) learn, from features computed once.

LiT (Zhai et al., 2022) makes a zero-shot model from a pretrained image model by locking it and training
the text side on captioned images. Here the text transformer is locked too (MiniLM stays the pretrained
sentence encoder), so the image trunk's pooled features ``[N, 1280]`` and MiniLM's mean-pooled outputs
``[C, 384]`` (one per distinct caption: 8000 captions are about 1800 distinct ones) do not change during
pre-training. They are computed once, the trunk in eval mode (ImageNet's running BatchNorm statistics, no
augmentation: the images go through the model's validation preprocessing), and the projections are then
trained contrastively on them: OpenCLIP's ``ClipLoss``, AdamW (β 0.9/0.999, ε 1e-8, as ``open_clip_train``
sets them for a non-ViT model), ``open_clip_train``'s cosine schedule with
warm-up, weight decay on the projection matrices only (as ``open_clip_train`` excludes gains, biases and the
logit scale). Written by hand because ``open_clip_train`` has no hook to train on cached tower outputs; a
pre-training then takes about a minute instead of 20 (v3's probe through ``open_clip_starft.main``, trunk
locked in train mode, 5 epochs at 64 px: ``docs/archive/waterbirds-lite-v3-probe.json``).

The zero-shot model is the init model with the trained projections and logit scale; everything else is
bit-identical to the init (the pretrained trunk with its running statistics, MiniLM).
"""
from __future__ import annotations

import math
import time

import torch

from open_clip_starft.errors import DataError


def _shard_files(pattern: str) -> list[str]:
    from open_clip_train.data import expand_urls
    return expand_urls(pattern)[0]


def read_captioned(pattern: str, preprocess) -> tuple[torch.Tensor, list[str]]:
    """``(images [N, 3, H, W] preprocessed, captions [N])`` of the webdataset shards ``pattern`` (``.jpg`` +
    ``.txt`` per sample, in shard order); a sample without either is a one-line ``DataError``."""
    import webdataset as wds
    images, captions = [], []
    for sample in wds.WebDataset(_shard_files(pattern), shardshuffle=False).decode("pil"):
        if "jpg" not in sample or "txt" not in sample:
            raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')} lacks a .jpg or a .txt: "
                            "rebuild the pre-training set (python -m studies.waterbirds_lite build)")
        images.append(preprocess(sample["jpg"]))
        captions.append(sample["txt"])
    if not images:
        raise DataError(f"{pattern}: no samples: rebuild the pre-training set (python -m studies.waterbirds_lite build)")
    return torch.stack(images), captions


@torch.no_grad()
def trunk_features(model, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """``[N, F]`` pooled features of the image trunk (OpenCLIP ``TimmModel.trunk``) in eval mode."""
    trunk = model.visual.trunk.eval()
    return torch.cat([trunk(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def text_pooled(model, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``[C, W]`` mean-pooled outputs of the locked text transformer (OpenCLIP ``HFTextEncoder``) per token row:
    ``encode_text`` before the projection."""
    text = model.text
    out = []
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size]
        mask = (batch != text.config.pad_token_id).long()
        out.append(text.pooler(text.transformer(input_ids=batch, attention_mask=mask), mask))
    return torch.cat(out)


def pretrain(init: str, pattern: str, *, seed: int, epochs: int, lr: float, batch_size: int, warmup: int,
             wd: float = 0.1, log=print) -> tuple[torch.nn.Module, dict]:
    """Train the projections and logit scale of CLIP-lite ``init`` (``local-dir:`` with a timm image tower and
    the MiniLM text tower) on the captioned shards ``pattern``; returns the model (eval mode) and a record
    (``loss`` per epoch, seconds of the feature pass and of training, ``distinct_captions``). ``seed`` draws the
    batch order; the init's projections come from its own seed."""
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    start = time.time()
    model, _, preprocess = open_clip.create_model_and_transforms(init)
    tokenizer = open_clip.get_tokenizer(init)
    model.eval()
    if not hasattr(model.visual, "trunk") or not hasattr(model.text, "pooler"):
        raise DataError(f"{init}: LiT pre-training needs a timm image tower and an HF text tower (CLIP-lite v3)")
    images, captions = read_captioned(pattern, preprocess)
    features = trunk_features(model, images)
    distinct = sorted(set(captions))
    pooled = text_pooled(model, tokenizer(distinct))
    index = {c: i for i, c in enumerate(distinct)}
    caption_of = torch.tensor([index[c] for c in captions])
    features_s = time.time() - start

    image_proj, text_proj = model.visual.head, model.text.proj
    decay = [p for p in (*image_proj.parameters(), *text_proj.parameters()) if p.ndim >= 2]
    no_decay = [p for p in (*image_proj.parameters(), *text_proj.parameters()) if p.ndim < 2] + [model.logit_scale]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.999), eps=1e-8)  # open_clip_train's for a non-ViT model
    steps_per_epoch = len(features) // batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{pattern}: {len(features)} samples, fewer than one batch of {batch_size}")
    scheduler = cosine_lr(optimizer, lr, warmup, epochs * steps_per_epoch)
    loss_fn, generator = ClipLoss(), torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order, total = torch.randperm(len(features), generator=generator), 0.0
        for i in range(steps_per_epoch):
            scheduler(epoch * steps_per_epoch + i)
            batch = order[i * batch_size:(i + 1) * batch_size]
            x = torch.nn.functional.normalize(image_proj(features[batch]), dim=-1)
            y = torch.nn.functional.normalize(text_proj(pooled[caption_of[batch]]), dim=-1)
            loss = loss_fn(x, y, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # open_clip_train's clamp
                model.logit_scale.clamp_(0, math.log(100))
            total += float(loss.detach())
        losses.append(total / steps_per_epoch)
        log(f"    LiT epoch {epoch + 1}/{epochs}: contrastive loss {losses[-1]:.4f}")
    model.eval()
    return model, {"recipe": "lit-cached", "loss": losses, "features_seconds": features_s,
                   "train_seconds": time.time() - start - features_s, "samples": len(features),
                   "distinct_captions": len(distinct)}
