"""StarLoss under torch.distributed (2 CPU processes, gloo) equals one process on the whole batch: CLIP, and
SigLIP with either Star form under each of SigLipLoss's --loss-dist-impl exchanges."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from open_clip_starft.method.loss import StarLoss

WORLD, B, D = 2, 5, 12
# (contrastive loss, Star form, SigLipLoss's dist_impl)
CONFIGS = [("clip", "softmax", None)] + [("siglip", form, impl) for form in ("softmax", "sigmoid")
                                         for impl in ("bidir", "shift", "reduce", "gather")]


def global_batch():
    g = torch.Generator().manual_seed(11)
    make = lambda: F.normalize(torch.randn(WORLD * B, D, generator=g), dim=-1)
    feats = {k: make() for k in ("image", "text", "spurious", "t_image", "t_spurious")}
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 1, 4, 2, 0])
    return feats, labels


def make_loss(kind, form, impl, rank=0, world_size=1):
    if kind == "clip":
        return StarLoss(gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    return StarLoss(SigLipLoss(rank=rank, world_size=world_size, dist_impl=impl), star_form=form)


def step(loss_fn, feats, labels, kind):
    """Total loss and gradients of the student features for one process's slice."""
    leaves = {k: feats[k].clone().requires_grad_() for k in ("image", "text", "spurious")}
    scale, bias = (torch.tensor(14.0), None) if kind == "clip" else (torch.tensor(10.0), torch.tensor(-3.0))
    out = loss_fn(leaves["image"], leaves["text"], scale, bias, spurious_features=leaves["spurious"],
                  teacher_image_features=feats["t_image"], teacher_spurious_features=feats["t_spurious"],
                  class_ids=labels, teacher_logit_scale=scale if kind == "siglip" else torch.tensor(100.0),
                  teacher_logit_bias=bias, output_dict=True)
    total = out["contrastive_loss"] + 0.7 * out["star_loss"]
    total.backward()
    return {k: v.detach() for k, v in out.items()}, total.detach(), {k: v.grad for k, v in leaves.items()}


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    feats, labels = global_batch()
    local = {k: v[rank * B:(rank + 1) * B] for k, v in feats.items()}
    for i, (kind, form, impl) in enumerate(CONFIGS):
        terms, total, grads = step(make_loss(kind, form, impl, rank, WORLD), local, labels[rank * B:(rank + 1) * B], kind)
        torch.save({"terms": terms, "total": total, "grads": grads}, os.path.join(out_dir, f"{i}-rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.e2e
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    feats, labels = global_batch()
    for i, (kind, form, impl) in enumerate(CONFIGS):
        ranks = [torch.load(tmp_path / f"{i}-rank{r}.pt") for r in range(WORLD)]
        terms, total, grads = step(make_loss(kind, form, impl), feats, labels, kind)
        config = (kind, form, impl)
        mean_total = sum(r["total"] for r in ranks) / WORLD
        assert abs(mean_total - total) < 1e-5, config
        for name in ("contrastive_loss", "star_loss"):
            mean_term = sum(r["terms"][name] for r in ranks) / WORLD
            assert abs(mean_term - terms[name]) < 1e-5 * max(1.0, abs(terms[name])), (config, name)
        assert terms["star_loss"] > 1e-3, config  # the Star term is really exercised
        # DDP averages parameter gradients over processes: rank gradients / WORLD, concatenated
        for name in ("image", "text", "spurious"):
            ddp = torch.cat([r["grads"][name] for r in ranks]) / WORLD
            assert torch.allclose(ddp, grads[name], atol=1e-5), (config, name, (ddp - grads[name]).abs().max())
