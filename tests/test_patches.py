"""patches/ for open_clip_torch 3.3.0: each applies cleanly to the installed files and does its job."""
import glob
import os
import shutil
import subprocess
import sys

import open_clip_train
import pytest

from runs import make_workspace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = sorted(glob.glob(os.path.join(ROOT, "patches", "*.patch")))
INSTALLED = os.path.dirname(open_clip_train.__file__)


def patched_copy(tmp_path, patches):
    """A copy of the installed open_clip_train package under ``tmp_path`` with ``patches`` applied."""
    shutil.copytree(INSTALLED, tmp_path / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__"))
    for patch in patches:
        result = subprocess.run(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-i", patch],
                                cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and "offset" not in result.stdout and "fuzz" not in result.stdout, result.stdout
    return tmp_path


def test_there_are_patches():
    assert len(PATCHES) >= 2


@pytest.mark.parametrize("patch", PATCHES, ids=os.path.basename)
def test_patch_applies_cleanly_to_the_installed_release(tmp_path, patch):
    assert open_clip_train.__file__  # the pinned 3.3.x release is what is installed
    import importlib.metadata
    assert importlib.metadata.version("open_clip_torch").startswith("3.3.")
    patched_copy(tmp_path, [patch])
    header = open(patch).read().split("\n--- ", 1)[0]
    assert len(header.split()) > 30  # a paragraph saying what and why


def run_python(code, pythonpath, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *code, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_patched_zero_shot_accuracy_works_with_this_numpy(tmp_path):
    copy = patched_copy(tmp_path, [p for p in PATCHES if "zero-shot" in p])
    code = ["-c", "import torch, open_clip_train.zero_shot as z; assert z.__file__.startswith(%r); "
                  "print(z.accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), topk=(1, 2)))" % str(copy)]
    result = run_python(code, copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[1.0, 2.0]"


def test_patched_main_trains_with_two_cpu_processes(tmp_path):
    ws = make_workspace(tmp_path / "ws", n=64, shards=2)
    args = ["--train-data", ws["data"], "--dataset-type", "webdataset", "--model", ws["model"], "--device", "cpu",
            "--batch-size", "16", "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--logs", str(tmp_path / "logs")]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29621", "-m", "--",
                "open_clip_train.main"]
    unpatched = run_python(launcher, tmp_path / "nothing", *args, "--name", "unpatched")
    assert unpatched.returncode != 0 and "device_ids" in unpatched.stderr  # upstream 3.3.0 as released
    copy = patched_copy(tmp_path / "copy", [p for p in PATCHES if "ddp-on-cpu" in p])
    patched = run_python(launcher, copy, *args, "--name", "patched")
    assert patched.returncode == 0, patched.stderr[-3000:]
    assert os.path.exists(tmp_path / "logs" / "patched" / "checkpoints" / "epoch_1.pt")
