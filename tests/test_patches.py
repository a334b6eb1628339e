"""patches/ for open_clip_torch 3.3.0: each applies cleanly to the installed files and does its job."""
import os
import shutil
import subprocess

import open_clip_train
import pytest

from runs import INSTALLED, PATCHES, make_workspace, patched_copy, run_python


def test_there_are_patches():
    assert [os.path.basename(p) for p in PATCHES] == ["0001-ddp-on-cpu.patch", "0002-zero-shot-accuracy-numpy-2.4.patch",
                                                      "0003-plugin-hook-losses-and-train-steps.patch"]


@pytest.mark.parametrize("patch", PATCHES, ids=os.path.basename)
def test_patch_applies_cleanly_to_the_installed_release(tmp_path, patch):
    assert open_clip_train.__file__  # the pinned 3.3.x release is what is installed
    import importlib.metadata
    assert importlib.metadata.version("open_clip_torch").startswith("3.3.")
    patched_copy(tmp_path, [patch])
    header = open(patch).read().split("\n--- ", 1)[0]
    assert len(header.split()) > 30  # a paragraph saying what and why


@pytest.mark.e2e  # a patched host copy, in a real process
def test_patched_zero_shot_accuracy_works_with_this_numpy(tmp_path):
    copy = patched_copy(tmp_path, [p for p in PATCHES if "zero-shot" in p])
    code = ["-c", "import torch, open_clip_train.zero_shot as z; assert z.__file__.startswith(%r); "
                  "print(z.accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), topk=(1, 2)))" % str(copy)]
    result = run_python(code, copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[1.0, 2.0]"


@pytest.mark.e2e
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


def test_patches_apply_together_in_order(tmp_path):
    shutil.copytree(INSTALLED, tmp_path / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__"))
    for patch in PATCHES:
        result = subprocess.run(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-i", patch],
                                cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and "fuzz" not in result.stdout and "FAILED" not in result.stdout, result.stdout


def run_params(ws, name):
    """A run's params.txt as {name: value}, its own name and folders written as NAME."""
    text = open(os.path.join(ws["root"], "logs", name, "params.txt")).read().replace(name, "NAME")
    return dict(line.split(": ", 1) for line in text.splitlines())


@pytest.mark.e2e
def test_starft_trains_through_the_plugin_hook_as_through_the_runtime_hooks(tmp_path):
    """patches 0001-0003 installed: upstream calls StarFT's hooks (nothing rebound) and the run is the one the
    rebound hooks give on OpenCLIP as released: the same losses, checkpoints (weights, optimizer state,
    StarFT fields) and params.txt."""
    import torch
    from runs import NO_CROP, checkpoints, log_of, metric, train_args
    ws = make_workspace(tmp_path / "ws", n=64, shards=2)
    copy = patched_copy(tmp_path / "copy", PATCHES, exact=False)
    starft = ["-m", "open_clip_starft.main"]
    # one batch of all 64 images per epoch without crops: every step sees the same samples in both
    # runs (and, the captions being drawn per sample key, the same spurious captions)
    args = train_args(ws, "runtime", "--starft-lambda", "0.5", *NO_CROP, epochs=3, batch_size=64)
    runtime = run_python(starft, tmp_path / "nothing", *args)
    assert runtime.returncode == 0, runtime.stderr[-3000:]
    args[args.index("--name") + 1] = "plugin"
    plugin = run_python(starft, copy, *args)
    assert plugin.returncode == 0, plugin.stderr[-3000:]
    logs = {name: log_of(ws, name) for name in ("runtime", "plugin")}
    assert "plugin hook (patches/0003)" in logs["plugin"] and "plugin hook" not in logs["runtime"]
    assert "rebound on open_clip_train for this run: nothing\n" in logs["plugin"]
    assert "rebound on open_clip_train for this run: open_clip_train.main.parse_args, " in logs["runtime"]
    params = {name: run_params(ws, name) for name in ("runtime", "plugin")}
    assert params["plugin"].pop("train_step") == params["plugin"].pop("loss") == "starft"
    assert "train_step" not in params["runtime"] and "loss" not in params["runtime"]  # upstream 3.3.0 has no such flags
    assert params["plugin"] == params["runtime"] and params["plugin"]["starft_lambda"] == "0.5"
    for key in ("Star lambda", "Step"):
        assert metric(logs["runtime"], key) == metric(logs["plugin"], key) and len(metric(logs["plugin"], key)) == 3
    for key in ("Contrastive_loss", "Star_loss", "Star term"):  # every step, not just the first
        assert metric(logs["plugin"], key) == pytest.approx(metric(logs["runtime"], key), rel=2e-4, abs=1e-6), key
    star = metric(logs["plugin"], "Star_loss")
    assert star[0] < 1e-6 < max(star)  # step 0: the student is the teacher; then they part
    assert checkpoints(ws, "plugin") == checkpoints(ws, "runtime") == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    for name in checkpoints(ws, "plugin"):
        ckpt = {run: torch.load(os.path.join(ws["root"], "logs", run, "checkpoints", name), weights_only=True)
                for run in ("runtime", "plugin")}
        assert set(ckpt["plugin"]) == set(ckpt["runtime"]) >= {"epoch", "name", "state_dict", "optimizer", "starft"}
        assert ckpt["plugin"]["epoch"] == ckpt["runtime"]["epoch"] and ckpt["plugin"].get("scaler") == ckpt["runtime"].get("scaler")
        assert ckpt["plugin"]["starft"] == ckpt["runtime"]["starft"] and ckpt["plugin"]["starft"]["starft_lambda"] == 0.5
        weights = {run: c["state_dict"] for run, c in ckpt.items()}
        assert weights["plugin"].keys() == weights["runtime"].keys()
        for key, value in weights["plugin"].items():
            torch.testing.assert_close(value, weights["runtime"][key], rtol=1e-5, atol=1e-6, msg=key)
        moments = {run: c["optimizer"]["state"] for run, c in ckpt.items()}
        for index, state in moments["plugin"].items():
            torch.testing.assert_close(state["exp_avg"], moments["runtime"][index]["exp_avg"], rtol=1e-5, atol=1e-7)


@pytest.mark.e2e
def test_plugin_train_step_refuses_to_run_without_starft_main(tmp_path):
    copy = patched_copy(tmp_path / "copy", [p for p in PATCHES if "plugin-hook" in p])
    ws = make_workspace(tmp_path / "ws", n=32, shards=1)
    args = ["--train-data", ws["data"], "--dataset-type", "webdataset", "--model", ws["model"], "--device", "cpu",
            "--batch-size", "16", "--epochs", "1", "--workers", "1", "--logs", str(tmp_path / "logs"),
            "--loss", "starft", "--train-step", "starft"]
    result = run_python(["-m", "open_clip_train.main"], copy, *args)
    assert result.returncode != 0 and "run `python -m open_clip_starft.main`" in result.stderr
    unknown = run_python(["-m", "open_clip_train.main"], copy, *args[:-1], "nonesuch")
    assert unknown.returncode != 0 and "No open_clip_train.train_steps entry point named 'nonesuch'" in unknown.stderr


@pytest.mark.e2e
def test_two_processes_give_the_same_losses_at_every_step_with_and_without_the_plugin_hook(tmp_path):
    """One StarftStep behind both loops: patches/0003's train_one_epoch_with_step and host/loop.py."""
    from runs import NO_CROP, log_of, metric, train_args
    ws = make_workspace(tmp_path / "ws", n=64, shards=2)
    copy = patched_copy(tmp_path / "copy", PATCHES, exact=False)  # 0001: DDP on CPU without rebinding
    # Each process reads one shard of 32 as its one batch per epoch, without crops, and the spurious
    # caption is the clean one (--starft-suffix none): every step's global batch is then the same set
    # of samples and captions in both runs (the order inside a batch changes neither loss).
    logs = {}
    for name, pythonpath, port in (("runtime2", tmp_path / "nothing", "29631"), ("plugin2", copy, "29632")):
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, "-m", "--",
                    "open_clip_starft.main"]
        args = train_args(ws, name, "--starft-lambda", "0.5", "--starft-suffix", "none", "--gather-with-grad",
                          *NO_CROP, epochs=4, batch_size=32)
        result = run_python(launcher, pythonpath, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[name] = log_of(ws, name)
    assert "plugin hook (patches/0003)" in logs["plugin2"] and "plugin hook" not in logs["runtime2"]
    for key in ("Step", "Star lambda"):
        assert metric(logs["runtime2"], key) == metric(logs["plugin2"], key) == (
            list(range(4)) if key == "Step" else [0.5 * (1 - s / 4) for s in range(4)])
    for key in ("Contrastive_loss", "Star_loss", "Loss", "Star term"):
        runtime, plugin = metric(logs["runtime2"], key), metric(logs["plugin2"], key)
        assert len(runtime) == len(plugin) == 4, key
        assert plugin == pytest.approx(runtime, rel=2e-4, abs=1e-6), key  # logged with 5-6 significant digits
    assert max(metric(logs["plugin2"], "Star term")) > 1e-4  # the Star term is exercised after step 0


def patch_functions(patch_path):
    """{name: source} of every top-level function patches add (the ``+def`` blocks, ``+`` removed)."""
    found, current = {}, None
    for line in open(patch_path, encoding="utf-8").read().split("\n"):
        if line.startswith("+def "):
            current = line[5:].split("(")[0]
            found[current] = []
        elif current and not line.startswith("+"):
            current = None
        if current:
            found[current].append(line[1:])
    return {name: "\n".join(lines).rstrip() + "\n" for name, lines in found.items()}


def test_the_loop_patches_0003_adds_is_host_loop_character_for_character():
    """One source for the two loops: patches/0003's train.py functions equal host/loop.py's."""
    import inspect
    from open_clip_starft.host import loop
    patch = next(p for p in PATCHES if "plugin-hook" in p)
    added = patch_functions(patch)
    for name in loop.PATCHED_FUNCTIONS:
        ours = "\n".join(line.rstrip() for line in inspect.getsource(getattr(loop, name)).split("\n")).rstrip() + "\n"
        theirs = "\n".join(line.rstrip() for line in added[name].split("\n"))
        assert theirs == ours, (f"patches/0003's {name} differs from host/loop.py's: rewrite its '+' lines in the patch "
                                "from inspect.getsource(open_clip_starft.host.loop.%s)" % name)


def test_a_changed_host_loop_is_caught(tmp_path):
    """The comparison above fails on a one-character change to the patch's copy."""
    patch = next(p for p in PATCHES if "plugin-hook" in p)
    text = open(patch, encoding="utf-8").read()
    changed = tmp_path / "changed.patch"
    changed.write_text(text.replace("+        batch_count = i + 1\n", "+        batch_count = i + 2\n", 1))
    from open_clip_starft.host import loop
    import inspect
    assert patch_functions(str(changed))["train_one_epoch_with_step"] != inspect.getsource(loop.train_one_epoch_with_step)
    assert patch_functions(patch)["train_one_epoch_with_step"] == inspect.getsource(loop.train_one_epoch_with_step)
