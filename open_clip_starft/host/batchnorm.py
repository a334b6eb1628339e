"""``--starft-freeze-bn-stats``: the fine-tuned model's BatchNorm layers held in eval mode (and
``batchnorm_layers``, the one way the host finds BatchNorm layers).

In train mode a BatchNorm layer normalises with the batch's statistics and moves its running statistics
towards them; evaluation then uses the moved statistics. Held in eval mode, the layer normalises with the
zero-shot model's running statistics and never changes them; its affine weights still train. Written by
hand because the host's ``model.train()`` at each epoch (and the evaluator's restore after a mid-epoch
score) would put the layers back in train mode: ``FrozenBatchNormStats.hold()`` is called before every
step. OpenCLIP's ``--lock-image-freeze-bn-stats`` does this only for locked towers.
"""
from __future__ import annotations

import torch


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm layers of ``model``: any ``torch.nn.modules.batchnorm._BatchNorm``, timm's
    ``BatchNormAct2d`` included."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class FrozenBatchNormStats:
    """The BatchNorm layers of ``model``, held in eval mode by ``hold()``."""

    def __init__(self, model: torch.nn.Module):
        self.layers = batchnorm_layers(model)

    def hold(self) -> None:
        for layer in self.layers:
            layer.eval()
