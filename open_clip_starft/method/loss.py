"""The StarFT objective: OpenCLIP's contrastive loss plus the Star regulariser.

``L = L_contrastive + λ · L_star``. The contrastive term is upstream's own module (``ClipLoss`` for CLIP,
``SigLipLoss`` for SigLIP/SigLIP2, with its ``--loss-dist-impl``); this module returns ``L_star``
unweighted, and the train step weights it by λ.

The Star term compares the student's and the frozen zero-shot (teacher) model's image-to-spurious-caption
logits ``z_ij = t · x_i·s_j (+ b)``, rows ``x_i`` the image features, columns ``s_j`` the features of the
spurious captions, over the pairs ``V = {(i, j) : c(j) ≠ c(i)}`` of different classes (the same-class
mask; the diagonal is always masked). ``t`` is the teacher's ``logit_scale.exp()`` and ``b`` the
teacher's ``logit_bias``, on both sides (as the official release uses the teacher's scale). Two forms:

- ``softmax`` (the paper's; the default for every model):
  ``L_star = (1/R) Σ_i KL(q̃_i ‖ q_i)``, ``q_i = softmax_{j : (i,j) ∈ V}(z_ij)``. A bias is the same for every
  column of a row, so it cancels: SigLIP and CLIP get the same term and λ keeps its meaning.
- ``sigmoid`` (for sigmoid-loss models, ``--starft-star-form sigmoid``): each pair is the Bernoulli
  ``p_ij = σ(t·x_i·s_j + b)`` the model's own SigLIP likelihood uses, and
  ``L_star = (1/R) Σ_{(i,j) ∈ V} [p̃_ij log(p̃_ij / p_ij) + (1 − p̃_ij) log((1 − p̃_ij) / (1 − p_ij))]``:
  summed over a row's pairs and averaged over rows as the softmax form (and ``SigLipLoss``) is. It needs
  the teacher's bias ``b``.

A row whose every column is masked contributes exactly 0 (and no gradient) in both forms.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features

from open_clip_starft.method.distributed import all_gather_cat
from open_clip_starft.method.forms import STAR_FORMS


def star_loss(
        image_features: torch.Tensor,
        spurious_features: torch.Tensor,
        teacher_image_features: torch.Tensor,
        teacher_spurious_features: torch.Tensor,
        row_labels: torch.Tensor,
        col_labels: Optional[torch.Tensor] = None,
        logit_scale: Union[float, torch.Tensor] = 100.0,
        mask_same_class: bool = True,
        form: str = "softmax",
        logit_bias: Union[float, torch.Tensor, None] = None,
) -> torch.Tensor:
    """The Star term ``L_star`` (unweighted; see the module docstring), a 0-dim float32 tensor.

    Args:
        image_features: ``[R, D]`` student image features (rows), L2-normalised.
        spurious_features: ``[C, D]`` student features of the spurious captions (columns).
        teacher_image_features: ``[R, D]`` the zero-shot model's image features.
        teacher_spurious_features: ``[C, D]`` the zero-shot model's spurious-caption features.
        row_labels: ``[R]`` class id of each row.
        col_labels: ``[C]`` class id of each column; defaults to ``row_labels`` when ``R == C``.
        logit_scale: the multiplier ``t`` (the zero-shot model's ``logit_scale.exp()``), both sides.
        mask_same_class: drop the pairs with ``c(j) == c(i)`` (both sides).
        form: ``softmax`` (KL of the row softmaxes; a bias would cancel) or ``sigmoid`` (Bernoulli KL per pair).
        logit_bias: the zero-shot model's ``logit_bias`` ``b``, both sides; required by ``sigmoid``.

    Computed in float32 (float64 for float64 inputs) with autocast disabled, so a float16 run
    cannot overflow the mask.
    """
    if form not in STAR_FORMS:
        raise ValueError(f"Star term form {form!r}: choose {' or '.join(STAR_FORMS)}")
    if form == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid Star term needs the teacher's logit_bias (a SigLIP model)")
    num_rows, num_cols = image_features.shape[0], spurious_features.shape[0]
    if col_labels is None:
        if num_rows != num_cols:
            raise ValueError(f"col_labels is required when rows ({num_rows}) and columns ({num_cols}) differ")
        col_labels = row_labels
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        scale = torch.as_tensor(logit_scale, device=image_features.device).to(dtype)
        student_logits = scale * image_features.to(dtype) @ spurious_features.to(dtype).T
        teacher_logits = scale * teacher_image_features.to(dtype) @ teacher_spurious_features.to(dtype).T
        if mask_same_class:
            valid = row_labels.view(-1, 1) != col_labels.view(1, -1)
        else:
            valid = torch.ones_like(student_logits, dtype=torch.bool)
        if form == "sigmoid":
            bias = torch.as_tensor(logit_bias, device=image_features.device).to(dtype)
            student_logits, teacher_logits = student_logits + bias, teacher_logits + bias
            # KL(Bern(σ(a)) ‖ Bern(σ(z))) = σ(a)(log σ(a) − log σ(z)) + σ(−a)(log σ(−a) − log σ(−z))
            kl = (torch.sigmoid(teacher_logits) * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
                  + torch.sigmoid(-teacher_logits) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)))
            return torch.where(valid, kl, 0.0).sum() / num_rows
        # Masked columns leave the softmax (-inf). A row with no valid column keeps its logits
        # (finite softmax) and is zeroed by `valid` below, so it gives exactly 0 and no gradient.
        drop = ~valid & valid.any(dim=1, keepdim=True)
        student_logp = student_logits.masked_fill(drop, float("-inf")).log_softmax(dim=1)
        teacher_logp = teacher_logits.masked_fill(drop, float("-inf")).log_softmax(dim=1)
        kl = torch.where(valid, teacher_logp.exp() * (teacher_logp - student_logp), 0.0)
        return kl.sum() / num_rows


class StarTerm(torch.nn.Module):
    """``L_star`` (``star_loss``) under ``torch.distributed``: this process's images are the rows and the
    columns (student spurious features, with gradient when ``gather_with_grad``; teacher spurious features;
    class ids) come from every process, so N processes with batch B give the same term (mean over processes)
    and, after DDP's gradient averaging, the same gradients as one process with batch N·B. Without
    ``gather_with_grad`` the columns from other processes carry no gradient, as in ``ClipLoss``."""

    def __init__(self, mask_same_class: bool = True, form: str = "softmax", gather_with_grad: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        if form not in STAR_FORMS:
            raise ValueError(f"Star term form {form!r}: choose {' or '.join(STAR_FORMS)}")
        self.mask_same_class, self.form = mask_same_class, form
        self.gather_with_grad, self.rank, self.world_size, self.use_horovod = (
            gather_with_grad, rank, world_size, use_horovod)

    def gather_columns(self, spurious_features, teacher_spurious_features, class_ids):
        """``[B, D], [B, D], [B]`` on each process → ``[N·B, D], [N·B, D], [N·B]``."""
        if self.world_size == 1:
            return spurious_features, teacher_spurious_features, class_ids
        spurious, teacher_spurious = gather_features(
            spurious_features, teacher_spurious_features,
            local_loss=False, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod)
        return spurious, teacher_spurious, all_gather_cat(class_ids, self.use_horovod)

    def forward(self, image_features, spurious_features, teacher_image_features, teacher_spurious_features,
                class_ids, teacher_logit_scale, teacher_logit_bias=None) -> torch.Tensor:
        """``L_star`` over this process's rows ``[B, D]`` and every process's columns (0-dim)."""
        columns, teacher_columns, column_ids = self.gather_columns(
            spurious_features, teacher_spurious_features, class_ids)
        return star_loss(image_features, columns, teacher_image_features, teacher_columns,
                         row_labels=class_ids, col_labels=column_ids, logit_scale=teacher_logit_scale,
                         mask_same_class=self.mask_same_class, form=self.form, logit_bias=teacher_logit_bias)


class StarLoss(torch.nn.Module):
    """OpenCLIP's contrastive loss and the (unweighted) Star term, as a dict of named terms.

    ``contrastive``: upstream's loss module (``ClipLoss`` or ``SigLipLoss``, e.g. from
    ``open_clip.create_loss(args)``); without it a ``ClipLoss(**clip_loss_kwargs)``. The Star term's
    columns are gathered across processes with the contrastive loss's rank and world size, with gradient
    when ``ClipLoss`` gathers with gradient (``--gather-with-grad``) and always for ``SigLipLoss`` (whose
    exchanges all carry gradient). ``star_form``: ``softmax`` or ``sigmoid`` (see the module docstring).
    """

    def __init__(self, contrastive: torch.nn.Module | None = None, mask_same_class: bool = True,
                 star_form: str = "softmax", **clip_loss_kwargs):
        super().__init__()
        if contrastive is not None and clip_loss_kwargs:
            raise ValueError(f"pass either a contrastive loss or ClipLoss's arguments, not both: {sorted(clip_loss_kwargs)}")
        self.contrastive = contrastive if contrastive is not None else ClipLoss(**clip_loss_kwargs)
        c = self.contrastive
        self.star = StarTerm(mask_same_class, star_form, gather_with_grad=getattr(c, "gather_with_grad", True),
                             rank=c.rank, world_size=c.world_size, use_horovod=getattr(c, "use_horovod", False))

    def forward(
            self,
            image_features,
            text_features,
            logit_scale,
            logit_bias=None,
            *,
            spurious_features=None,
            teacher_image_features=None,
            teacher_spurious_features=None,
            class_ids=None,
            teacher_logit_scale=None,
            teacher_logit_bias=None,
            output_dict: bool = False,
    ):
        """``{"contrastive_loss", "star_loss"}`` (0-dim; ``star_loss`` is the unweighted ``L_star``, present only
        when ``spurious_features`` are given), or the tuple of the same values without ``output_dict``.

        ``image_features``/``text_features [B, D]``, ``logit_scale``/``logit_bias``: the student's, for the
        contrastive term. ``spurious_features [B, D]``: the student's features of the spurious captions;
        ``teacher_*``: the zero-shot model's features, scale and bias; ``class_ids [B]``: each sample's class."""
        contrastive_loss = self.contrastive(image_features, text_features, logit_scale, logit_bias)
        losses = {"contrastive_loss": contrastive_loss}
        if spurious_features is not None:
            losses["star_loss"] = self.star(image_features, spurious_features, teacher_image_features,
                                            teacher_spurious_features, class_ids, teacher_logit_scale,
                                            teacher_logit_bias)
        return losses if output_dict else tuple(losses.values())
