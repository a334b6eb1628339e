"""StarLoss under torch.distributed (2 CPU processes, gloo) equals one process on the whole batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from open_clip_starft.method.loss import StarLoss

WORLD, B, D = 2, 5, 12


def global_batch():
    g = torch.Generator().manual_seed(11)
    make = lambda: F.normalize(torch.randn(WORLD * B, D, generator=g), dim=-1)
    feats = {k: make() for k in ("image", "text", "spurious", "t_image", "t_spurious")}
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 1, 4, 2, 0])
    return feats, labels


def step(loss_fn, feats, labels):
    """Total loss and gradients of the student features for one process's slice."""
    leaves = {k: feats[k].clone().requires_grad_() for k in ("image", "text", "spurious")}
    out = loss_fn(leaves["image"], leaves["text"], torch.tensor(14.0), spurious_features=leaves["spurious"],
                  teacher_image_features=feats["t_image"], teacher_spurious_features=feats["t_spurious"],
                  class_ids=labels, teacher_logit_scale=torch.tensor(100.0), output_dict=True)
    total = out["contrastive_loss"] + 0.7 * out["star_loss"]
    total.backward()
    return {k: v.detach() for k, v in out.items()}, total.detach(), {k: v.grad for k, v in leaves.items()}


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    feats, labels = global_batch()
    local = {k: v[rank * B:(rank + 1) * B] for k, v in feats.items()}
    loss_fn = StarLoss(gather_with_grad=True, cache_labels=True, rank=rank, world_size=WORLD)
    terms, total, grads = step(loss_fn, local, labels[rank * B:(rank + 1) * B])
    torch.save({"terms": terms, "total": total, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    feats, labels = global_batch()
    terms, total, grads = step(StarLoss(), feats, labels)

    mean_total = sum(r["total"] for r in ranks) / WORLD
    assert abs(mean_total - total) < 1e-5
    for name in ("contrastive_loss", "star_loss"):
        mean_term = sum(r["terms"][name] for r in ranks) / WORLD
        assert abs(mean_term - terms[name]) < 1e-5, name
    assert terms["star_loss"] > 1e-3  # the Star term is really exercised
    # DDP averages parameter gradients over processes: rank gradients / WORLD, concatenated
    for name in ("image", "text", "spurious"):
        ddp = torch.cat([r["grads"][name] for r in ranks]) / WORLD
        assert torch.allclose(ddp, grads[name], atol=1e-5), (name, (ddp - grads[name]).abs().max())
