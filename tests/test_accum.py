"""--accum-freq K: K micro-batches of B give the loss and the gradients of one batch of K·B (float64), the Star
term included, for CLIP and SigLIP, in 1 and 2 processes (gloo); the data resumes at the right micro-batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import SigLipLoss

from open_clip_starft.host.batch import Batch
from open_clip_starft.host.state import Resumed
from open_clip_starft.method.loss import StarLoss
from open_clip_starft.tools.tiny_model import build_tiny_model
from test_step import STEPS, Run, make_batch, step_args

B = 4  # micro-batch size
KINDS = [("clip", "softmax"), ("siglip", "softmax"), ("siglip", "sigmoid")]


def make_loss(kind, form, rank=0, world_size=1):
    if kind == "siglip":
        return StarLoss(SigLipLoss(rank=rank, world_size=world_size), star_form=form)
    return StarLoss(gather_with_grad=True, rank=rank, world_size=world_size)


def micro_batches(seed, count):
    """``count`` micro-batches of B in float64 (the images; tokens and class ids as they are)."""
    out = []
    for k in range(count):
        images, texts, spurious, labels = make_batch(seed * 100 + k, n=B)
        out.append(Batch(images.double(), texts, spurious, labels))
    return out


def concatenated(batches):
    return Batch(*(torch.cat(parts) for parts in zip(*(b[:4] for b in batches))))


def make_run(tmp_path, kind, form, rank=0, world_size=1):
    """A float64 step at step 1 (λ = 0.375) whose student has moved away from the teacher (Star term ≠ 0)."""
    model, _ = build_tiny_model(seed=0, siglip=kind == "siglip")
    args = step_args(tmp_path, rank=rank, world_size=world_size, starft_star_form=form)
    args.siglip = kind == "siglip"
    run = Run(args, loss=make_loss(kind, form, rank, world_size), model=model.double())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    run.start()
    return run


def step_of(run, batches, mode, terms=("contrastive_loss", "star_loss")):
    """Loss values and parameter gradients of one optimizer step on ``batches``: ``accumulate`` (the step's
    --accum-freq path), ``whole`` (one batch of all of them), or ``per_micro_batch`` (the WRONG way: each
    micro-batch's own loss, Star term and contrastive term within the micro-batch, gradients averaged).
    ``terms``: the loss terms backpropagated."""
    run.model.zero_grad()
    kwargs = dict(step=1, epoch=0, num_batches_per_epoch=STEPS)
    values = []
    if mode == "accumulate":
        for losses, _, log in run.step.accumulate(run.model, batches, run.loss, run.args, **kwargs):
            sum(losses[t] for t in terms).backward()
            values.append({**{k: v.item() for k, v in losses.items()}, "star_term": log["star_term"]})
    elif mode == "whole":
        losses, _, log = run.step(run.model, concatenated(batches), run.loss, run.args, **kwargs)
        sum(losses[t] for t in terms).backward()
        values.append({**{k: v.item() for k, v in losses.items()}, "star_term": log["star_term"]})
    else:
        for batch in batches:
            losses, _, log = run.step(run.model, batch, run.loss, run.args, **kwargs)
            (sum(losses[t] for t in terms) / len(batches)).backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    return values, grads


def assert_same_grads(got, want, rel=1e-9):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item() + 1e-12
        assert (got[name] - want[name]).abs().max().item() <= rel * scale, name


@pytest.mark.parametrize("kind,form", KINDS)
def test_two_micro_batches_give_the_loss_and_gradients_of_the_doubled_batch(tmp_path, kind, form):
    batches = micro_batches(seed=1, count=2)
    accumulated, grads = step_of(make_run(tmp_path, kind, form), batches, "accumulate")
    (whole,), whole_grads = step_of(make_run(tmp_path, kind, form), batches, "whole")
    assert len(accumulated) == 2 and whole["star_term"] > 1e-5  # the Star term is exercised
    for values in accumulated:  # each micro-batch's terms are the whole batch's
        assert values == pytest.approx(whole, rel=1e-10, abs=1e-12)
    assert_same_grads(grads, whole_grads)
    assert grads["logit_scale"].abs().item() > 0  # counted once, not once per micro-batch
    # the Star term's own gradient: accumulated, it is the whole batch's; a Star term taken within each
    # micro-batch instead (its columns only that micro-batch's) is told apart
    star = ("star_loss",)
    _, star_grads = step_of(make_run(tmp_path, kind, form), batches, "accumulate", star)
    _, whole_star = step_of(make_run(tmp_path, kind, form), batches, "whole", star)
    _, wrong_star = step_of(make_run(tmp_path, kind, form), batches, "per_micro_batch", star)
    assert_same_grads(star_grads, whole_star)
    with pytest.raises(AssertionError):
        assert_same_grads(wrong_star, whole_star, rel=0.01)


def test_a_resumed_accumulating_run_continues_after_the_right_micro_batch(tmp_path):
    args = step_args(tmp_path)
    args.accum_freq = 2
    run = Run(args, resumed=Resumed("x.pt", epoch=0, batches_done=1))
    assert run.start() == 1 and run.data["train"].started_from == (0, 2)  # the dataloader counts micro-batches
    assert run.step.num_batches == STEPS // 2  # optimizer steps per epoch, as upstream counts them
    # another --accum-freq would resume a mid-epoch checkpoint at another sample: named as a changed setting
    from open_clip_starft.host.state import changes
    old = run.state.history_entry(args)
    args.accum_freq = 4
    assert changes(old, run.state.history_entry(args), mid_epoch=True) == ["--accum-freq 2 → 4"]
    assert changes(old, run.state.history_entry(args), mid_epoch=False) == []


WORLD = 2


def _worker(rank, tmp_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for kind, form in KINDS:
            run = make_run(tmp_path / f"rank{rank}", kind, form, rank, WORLD)
            mine = micro_batches(seed=1, count=2 * WORLD)[2 * rank:2 * rank + 2]
            values, grads = step_of(run, mine, "accumulate")
            torch.save({"values": values, "grads": grads}, tmp_path / f"{kind}-{form}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_processes_accumulating_two_micro_batches_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(tmp_path, 29700), nprocs=WORLD, join=True)
    for kind, form in KINDS:
        ranks = [torch.load(tmp_path / f"{kind}-{form}-rank{r}.pt") for r in range(WORLD)]
        (whole,), whole_grads = step_of(make_run(tmp_path, kind, form), micro_batches(seed=1, count=2 * WORLD), "whole")
        for key in whole:  # the loss is the mean over processes (DDP averages the gradients likewise)
            rel = 1e-6 if key == "star_term" else 1e-10  # the logged term travels in the step's float32 report
            mean = sum(r["values"][-1][key] for r in ranks) / WORLD
            assert mean == pytest.approx(whole[key], rel=rel, abs=1e-12), (kind, form, key)
        ddp = {n: sum(r["grads"][n] for r in ranks) / WORLD for n in whole_grads}
        assert_same_grads(ddp, whole_grads)
