"""The StarFT objective: OpenCLIP's contrastive loss plus the Star regulariser.

``L = L_contrastive + λ · L_star`` with

    L_star = (1/R) Σ_i KL(q̃_i ‖ q_i),   q_i = softmax_j over {j : c(j) ≠ c(i)} of t · x_i·s_j

where rows ``x_i`` are the student's image features, columns ``s_j`` its features of the
spurious captions, ``q̃`` the same from the frozen zero-shot (teacher) model and ``t`` the
teacher's ``logit_scale.exp()`` on both sides (as in the official release). Same-class pairs
(the diagonal included) are masked on both sides; a row whose every column is masked contributes
exactly 0.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss, gather_features

try:
    import horovod.torch as hvd
except ImportError:
    hvd = None


def star_loss(
        image_features: torch.Tensor,
        spurious_features: torch.Tensor,
        teacher_image_features: torch.Tensor,
        teacher_spurious_features: torch.Tensor,
        row_labels: torch.Tensor,
        col_labels: Optional[torch.Tensor] = None,
        logit_scale: Union[float, torch.Tensor] = 100.0,
        mask_same_class: bool = True,
) -> torch.Tensor:
    """The Star term, a 0-dim float32 tensor.

    Args:
        image_features: ``[R, D]`` student image features (rows), L2-normalised.
        spurious_features: ``[C, D]`` student features of the spurious captions (columns).
        teacher_image_features: ``[R, D]`` the zero-shot model's image features.
        teacher_spurious_features: ``[C, D]`` the zero-shot model's spurious-caption features.
        row_labels: ``[R]`` class id of each row.
        col_labels: ``[C]`` class id of each column; defaults to ``row_labels`` when ``R == C``.
        logit_scale: the multiplier ``t`` (the zero-shot model's ``logit_scale.exp()``), both sides.
        mask_same_class: drop the pairs with ``c(j) == c(i)`` from both softmaxes.

    Computed in float32 with autocast disabled whatever the input dtype, so a float16 run
    cannot overflow the mask.
    """
    num_rows, num_cols = image_features.shape[0], spurious_features.shape[0]
    if col_labels is None:
        if num_rows != num_cols:
            raise ValueError(f"col_labels is required when rows ({num_rows}) and columns ({num_cols}) differ")
        col_labels = row_labels
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        scale = torch.as_tensor(logit_scale, device=image_features.device).float()
        student_logits = scale * image_features.float() @ spurious_features.float().T
        teacher_logits = scale * teacher_image_features.float() @ teacher_spurious_features.float().T
        if mask_same_class:
            valid = row_labels.view(-1, 1) != col_labels.view(1, -1)
        else:
            valid = torch.ones_like(student_logits, dtype=torch.bool)
        # Masked columns leave the softmax (-inf). A row with no valid column keeps its logits
        # (finite softmax) and is zeroed by `valid` below, so it gives exactly 0 and no gradient.
        drop = ~valid & valid.any(dim=1, keepdim=True)
        student_logp = student_logits.masked_fill(drop, float("-inf")).log_softmax(dim=1)
        teacher_logp = teacher_logits.masked_fill(drop, float("-inf")).log_softmax(dim=1)
        kl = torch.where(valid, teacher_logp.exp() * (teacher_logp - student_logp), 0.0)
        return kl.sum() / num_rows


def _gather_labels(labels: torch.Tensor, world_size: int, use_horovod: bool) -> torch.Tensor:
    if use_horovod:
        return hvd.allgather(labels)
    gathered = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(gathered, labels)
    return torch.cat(gathered)


class StarLoss(ClipLoss):
    """OpenCLIP's ``ClipLoss`` plus the Star term, in the shape of its ``DistillClipLoss``.

    The contrastive term and its distributed gather are ``ClipLoss``'s own code. Under
    ``torch.distributed`` the Star term keeps this process's images as rows and gathers the
    columns (student spurious features, with gradient when ``gather_with_grad``; teacher spurious
    features; labels) from every process, so that N processes with batch B give the same loss
    (mean over processes) and, after DDP's gradient averaging, the same gradients as one process
    with batch N·B. Without ``gather_with_grad`` the columns from other processes carry no
    gradient, as in ``ClipLoss``.
    """

    def __init__(self, mask_same_class: bool = True, **clip_loss_kwargs):
        super().__init__(**clip_loss_kwargs)
        self.mask_same_class = mask_same_class

    def gather_columns(self, spurious_features, teacher_spurious_features, labels):
        """``[B, D], [B, D], [B]`` on each process → ``[N·B, D], [N·B, D], [N·B]``."""
        if self.world_size == 1:
            return spurious_features, teacher_spurious_features, labels
        spurious, teacher_spurious = gather_features(
            spurious_features, teacher_spurious_features,
            local_loss=False, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod)
        return spurious, teacher_spurious, _gather_labels(labels, self.world_size, self.use_horovod)

    def forward(
            self,
            image_features,
            text_features,
            logit_scale,
            spurious_features=None,
            teacher_image_features=None,
            teacher_spurious_features=None,
            labels=None,
            teacher_logit_scale=None,
            star_lambda: float = 0.0,
            logit_bias=None,
            output_dict: bool = False,
    ):
        contrastive_loss = super().forward(image_features, text_features, logit_scale, logit_bias=logit_bias)
        if star_lambda:
            columns, teacher_columns, col_labels = self.gather_columns(
                spurious_features, teacher_spurious_features, labels)
            regulariser = star_lambda * star_loss(
                image_features, columns, teacher_image_features, teacher_columns,
                row_labels=labels, col_labels=col_labels,
                logit_scale=teacher_logit_scale, mask_same_class=self.mask_same_class)
        else:
            regulariser = torch.zeros((), device=image_features.device)
        if output_dict:
            return {"contrastive_loss": contrastive_loss, "star_loss": regulariser}
        return contrastive_loss, regulariser
