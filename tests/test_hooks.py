"""The host hooks: the seam's names rebound and restored (or passed to a patched host), no builtin rebound,
params.txt atomic on both paths, upstream's eval fixed, DDP on CPU, ImageNet eval."""
import argparse
import errno
import os

import numpy as np
import open_clip_train.main as host
import open_clip_train.zero_shot as host_zero_shot
import pytest
import torch

from open_clip_starft.demo.data import render_sample
from open_clip_starft.errors import StorageError
from open_clip_starft.host import hooks as hooks_module
from open_clip_starft.host import plugin
from open_clip_starft.host.hooks import StarftHooks, cpu_safe_ddp, zero_shot_accuracy
from open_clip_starft.host.params import build_parser
from runs import PATCHES, log_of, make_workspace, patched_copy, run, run_python, train_args


UNPATCHED_HOST = ["parse_args", "get_latest_checkpoint", "create_model_and_transforms", "pt_load", "get_data",
                  "create_loss", "train_one_epoch", "torch"]


def expected_rebound():
    """The names the seam must rebind on the installed OpenCLIP: all steps without patches/0003, then
    each upstream fix only where its patch is missing."""
    names = [] if plugin.host_has_plugin_hook() else [f"open_clip_train.main.{n}" for n in UNPATCHED_HOST]
    if hooks_module.host_lacks_ddp_fix() and "open_clip_train.main.torch" not in names:
        names.append("open_clip_train.main.torch")
    if hooks_module.host_lacks_accuracy_fix():
        names.append("open_clip_train.zero_shot.accuracy")
    return names


def test_the_seam_rebinds_what_the_installed_host_needs_and_restores_it():
    names = UNPATCHED_HOST + ["main", "get_latest_checkpoint"]
    before = {n: getattr(host, n) for n in names}
    accuracy_before, builtin_open = host_zero_shot.accuracy, open
    assert "open" not in vars(host)  # upstream's main uses the builtin
    expected = expected_rebound()
    with StarftHooks(build_parser().parse_args([])) as hooks:
        assert hooks.rebound == expected
        for name in UNPATCHED_HOST:
            assert (getattr(host, name) is not before[name]) == (f"open_clip_train.main.{name}" in hooks.rebound), name
        if "open_clip_train.main.torch" in hooks.rebound:
            assert host.torch.optim is torch.optim  # everything else is upstream's torch
            assert (host.torch.save == hooks.save_checkpoint) == (not hooks.use_plugin_hook)
        assert "open" not in vars(host) and open is builtin_open  # no builtin rebound, on the module or anywhere
        assert host.main is before["main"]
    assert all(getattr(host, n) is before[n] for n in names) and host_zero_shot.accuracy is accuracy_before


@pytest.mark.e2e  # a patched host copy, in real processes
def test_the_unpatched_host_gets_every_step_and_a_fully_patched_host_nothing(tmp_path):
    """Both paths whatever is installed here: upstream as released (every step rebound) and a copy with
    patches 0001-0003 (upstream calls the hooks itself: nothing rebound; the steps it calls are the seam's)."""
    code = ("import sys, open_clip_train.main as host, open_clip_train.plugins as p; "
            "from open_clip_starft.host.hooks import StarftHooks, SEAM; "
            "from open_clip_starft.host.params import build_parser; "
            "h = StarftHooks(build_parser().parse_args([])); "
            "assert h.__enter__() is h and h.use_plugin_hook and host.main.__code__.co_varnames[1] == 'hooks'; "
            "print(h.rebound); h.__exit__(None, None, None); "
            "steps = [n for n in vars(p.Hooks) if not n.startswith('_')]; "
            "missing = [n for n in steps if not callable(getattr(h, n, None))]; print(missing)")
    copy = patched_copy(tmp_path / "copy", PATCHES, exact=False)
    patched = run_python(["-c", code], copy)
    assert patched.returncode == 0, patched.stderr[-2000:]
    assert patched.stdout.split("\n")[:2] == ["[]", "[]"]
    unpatched = run_python(["-c", "from open_clip_starft.host.hooks import StarftHooks; "
                                  "from open_clip_starft.host.params import build_parser; "
                                  "h = StarftHooks(build_parser().parse_args([])); h.__enter__(); print(h.rebound)"],
                           tmp_path / "nothing")
    assert unpatched.returncode == 0, unpatched.stderr[-2000:]
    rebound = unpatched.stdout.strip()
    assert all(f"open_clip_train.main.{n}'" in rebound for n in UNPATCHED_HOST) and "open'" not in rebound


def test_params_txt_is_written_atomically_on_both_paths(tmp_path):
    """patches/0003 writes params.txt through ``open_params`` (atomic); upstream as released with the builtin
    ``open``, after the seam kept the previous content, written back when the run stops before its data."""
    hooks = StarftHooks(build_parser().parse_args([]))
    params = tmp_path / "params.txt"
    params.write_text("lr: 0.001\n")
    with pytest.raises(StorageError, match="no space left on"):
        with hooks.open_params(str(params)) as f:
            f.write("lr: 0.002\n")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert params.read_text() == "lr: 0.001\n" and os.listdir(tmp_path) == ["params.txt"]  # never truncated
    with hooks.open_params(str(params)) as f:
        f.write("lr: 0.003\n")
    assert params.read_text() == "lr: 0.003\n"
    # unpatched: upstream's own write fails half-way; leaving the seam puts the previous file back
    hooks.args = argparse.Namespace(logs=str(tmp_path.parent), name=tmp_path.name, rank=0)
    with pytest.raises(OSError):
        with hooks:
            hooks.keep_previous_params()
            with open(params, "w") as f:  # what upstream's main does
                f.write("lr: 0.0")
                raise OSError(errno.ENOSPC, "No space left on device")
    assert params.read_text() == "lr: 0.003\n" and os.listdir(tmp_path) == ["params.txt"]
    with hooks:  # a write that completes: get_data drops the previous file
        hooks.keep_previous_params()
        params.write_text("lr: 0.004\n")
        hooks.params_written()
    assert params.read_text() == "lr: 0.004\n" and os.listdir(tmp_path) == ["params.txt"]


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
