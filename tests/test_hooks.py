"""The host hooks: names rebound and restored, upstream's eval fixed, DDP on CPU, ImageNet eval."""
import os

import numpy as np
import open_clip_train.main as host
import open_clip_train.zero_shot as host_zero_shot
import pytest
import torch

from open_clip_starft.demo.data import render_sample
from open_clip_starft.host.hooks import StarftHooks, cpu_safe_ddp, zero_shot_accuracy
from open_clip_starft.host.params import build_parser
from runs import log_of, make_workspace, run, train_args


def test_hooks_rebind_and_restore_every_name():
    names = ["parse_args", "create_model_and_transforms", "get_data", "create_loss", "train_one_epoch", "pt_load", "torch",
             "get_latest_checkpoint"]
    before = {n: getattr(host, n) for n in names}
    accuracy_before = host_zero_shot.accuracy
    assert "open" not in vars(host)  # upstream's main uses the builtin
    with StarftHooks(build_parser().parse_args([])) as hooks:
        assert all(getattr(host, n) is not before[n] for n in names)
        assert host_zero_shot.accuracy is zero_shot_accuracy
        assert host.torch.optim is torch.optim  # everything else is upstream's torch
        assert vars(host)["open"] == hooks.open  # params.txt written atomically
    assert all(getattr(host, n) is before[n] for n in names) and host_zero_shot.accuracy is accuracy_before
    assert "open" not in vars(host)


def test_zero_shot_accuracy_counts_topk_hits():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.0, 0.3, 0.2]])
    target = torch.tensor([0, 1, 1, 2])
    assert zero_shot_accuracy(logits, target, topk=(1, 2)) == [1.0, 4.0]
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        with pytest.raises(TypeError):  # the upstream 3.3.0 function this replaces
            host_zero_shot.accuracy(logits, target, topk=(1, 2))


def test_cpu_safe_ddp_drops_device_ids_for_cpu_modules(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError):
            torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), device_ids=[torch.device("cpu")])
        wrapped = cpu_safe_ddp(torch.nn.Linear(2, 2), device_ids=[torch.device("cpu")])
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.device_ids is None
    finally:
        dist.destroy_process_group()


def test_help_shows_starft_and_openclip_flags():
    result = run(["--help"])
    assert result.returncode == 0
    assert "--starft-lambda" in result.stdout and "--train-data" in result.stdout and "--imagenet-val" in result.stdout


@pytest.mark.slow  # ~100 s (a 1000-class head); the fault itself is test_zero_shot_accuracy_counts_topk_hits
def test_imagenet_val_zero_shot_eval_runs_with_this_numpy(tmp_path):
    ws = make_workspace(tmp_path, n=64, shards=2)
    for label, folder in enumerate(["n01440764", "n01443537"]):  # ImageFolder: class ids 0 and 1
        os.makedirs(tmp_path / "val" / folder)
        for i in range(4):
            render_sample(i, seed=label, image_size=32)[0].save(tmp_path / "val" / folder / f"{i}.png")
    result = run(train_args(ws, "imagenet", "--imagenet-val", str(tmp_path / "val"), epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "imagenet")
    assert "Finished zero-shot imagenet" in log and "imagenet-zeroshot-val-top1" in log
