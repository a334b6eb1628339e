"""star_loss and StarLoss against independent float64 references."""
import pytest
import torch
import torch.nn.functional as F

from open_clip_starft.method.loss import StarLoss, star_loss
from reference import clip_loss_reference, star_loss_reference


def features(rows, cols, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return make(rows), make(cols), make(rows), make(cols)


CASES = [
    # (rows, cols, row labels, col labels or None)
    (8, 8, [0, 1, 2, 0, 1, 2, 3, 3], None),
    (6, 6, [0, 1, 2, 3, 4, 5], None),
    (4, 12, [0, 1, 1, 2], [0, 1, 1, 2, 3, 3, 0, 4, 2, 5, 1, 6]),  # R < C (a rank's rows, global columns)
    (5, 5, [7, 7, 7, 7, 7], None),  # all one class: every row fully masked
    (6, 6, [0, 0, 0, 1, 1, 1], None),
]


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("rows,cols,row_labels,col_labels", CASES)
def test_star_loss_matches_float64_reference(rows, cols, row_labels, col_labels, mask):
    x, s, tx, ts = features(rows, cols, seed=rows * 31 + cols)
    rl = torch.tensor(row_labels)
    cl = rl if col_labels is None else torch.tensor(col_labels)
    got = star_loss(x, s, tx, ts, rl, None if col_labels is None else cl, logit_scale=100.0, mask_same_class=mask)
    want = star_loss_reference(x, s, tx, ts, rl, cl, 100.0, mask)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.isfinite(got)
    if want.abs() < 1e-12:
        assert got.abs() < 1e-7
    else:
        assert abs(got.double() - want) / want.abs() < 1e-5
    if mask and len(set(row_labels)) == 1 and col_labels is None:
        assert got.item() == 0.0


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("rows,cols,row_labels,col_labels", CASES)
def test_star_loss_gradients_match_float64_autograd(rows, cols, row_labels, col_labels, mask):
    x, s, tx, ts = features(rows, cols, seed=rows * 7 + cols)
    rl = torch.tensor(row_labels)
    cl = rl if col_labels is None else torch.tensor(col_labels)
    x32, s32 = x.clone().requires_grad_(), s.clone().requires_grad_()
    star_loss(x32, s32, tx, ts, rl, cl, logit_scale=100.0, mask_same_class=mask).backward()
    x64, s64 = x.double().requires_grad_(), s.double().requires_grad_()
    star_loss_reference(x64, s64, tx, ts, rl, cl, 100.0, mask).backward()
    for got, want in ((x32.grad, x64.grad), (s32.grad, s64.grad)):
        assert torch.isfinite(got).all()
        # float32 logits at scale 100 carry ~1e-5 absolute error; compare against the gradient's scale
        scale = want.abs().max().clamp_min(1e-12)
        assert ((got.double() - want).abs().max() / scale) < 1e-5, (got - want).abs().max()


def test_fully_masked_rows_give_zero_loss_and_zero_gradient():
    x, s, tx, ts = features(4, 4, seed=3)
    labels = torch.tensor([2, 2, 2, 2])
    x.requires_grad_()
    s.requires_grad_()
    loss = star_loss(x, s, tx, ts, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(s.grad, torch.zeros_like(s))


def test_teacher_equal_to_student_gives_zero():
    x, s, _, _ = features(8, 8, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert star_loss(x, s, x, s, labels).abs().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_finite_and_close(dtype):
    x, s, tx, ts = features(8, 8, seed=5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])
    lowp = [t.to(dtype) for t in (x, s, tx, ts)]
    got = star_loss(*lowp, labels, logit_scale=100.0)
    want = star_loss_reference(*lowp, labels, labels, 100.0)  # same rounded inputs, float64 maths
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert abs(got.double() - want) < 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = star_loss(x, s, tx, ts, labels)
    assert under_autocast.dtype == torch.float32
    assert abs(under_autocast.double() - star_loss_reference(x, s, tx, ts, labels, labels, 100.0)) < 1e-5


def test_row_col_mismatch_needs_col_labels():
    x, s, tx, ts = features(3, 5)
    with pytest.raises(ValueError, match="col_labels"):
        star_loss(x, s, tx, ts, torch.tensor([0, 1, 2]))


def test_star_loss_module_returns_named_terms():
    img, txt, _, _ = features(6, 6, seed=6)
    x, s, tx, ts = features(6, 6, seed=7)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = StarLoss()
    out = loss(img, txt, torch.tensor(20.0), spurious_features=s, teacher_image_features=tx,
               teacher_spurious_features=ts, class_ids=labels, teacher_logit_scale=torch.tensor(100.0),
               output_dict=True)
    assert set(out) == {"contrastive_loss", "star_loss"}
    assert abs(out["contrastive_loss"].double() - clip_loss_reference(img, txt, 20.0)) < 1e-5
    # the Star term, unweighted (the step weights it by λ), uses the teacher's scale (100), not the
    # student's (20), on both sides
    want = star_loss_reference(img, s, tx, ts, labels, labels, 100.0)
    assert abs(out["star_loss"].double() - want) / want < 1e-5
    flyp = loss(img, txt, torch.tensor(20.0), output_dict=True)
    assert set(flyp) == {"contrastive_loss"} and torch.equal(flyp["contrastive_loss"], out["contrastive_loss"])
