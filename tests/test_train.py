"""End-to-end training through ``open_clip_starft.main`` on tiny real-JPEG shards (CPU)."""
import io
import math
import os
import re
import signal
import subprocess
import sys
import time

import open_clip
import open_clip_train.main
import pytest
import torch
import webdataset as wds

from open_clip_starft.demo.data import CLASSNAMES, render_sample, write_csv
from open_clip_starft.host.teacher import fingerprint
from runs import (NO_CROP, checkpoints, log_of, metric, register_tiny_config, run, run_main, tiny_weights, train_args,
                  workspace)


@pytest.fixture(scope="module")
def ws(tiny_data, tmp_path_factory):
    return workspace(tiny_data, tmp_path_factory.mktemp("train"))


def test_one_process_trains_logs_star_loss_and_saves_loadable_checkpoints(tiny_run):
    """The session's finished run (conftest.tiny_run: λ 0.7, linear schedule, 2 epochs × 2 steps)."""
    log = tiny_run["log"]
    star, contrastive = metric(log, "Star_loss"), metric(log, "Contrastive_loss")
    assert len(star) == len(contrastive) == 4  # 2 epochs × 2 steps, every step logged
    assert all(math.isfinite(v) for v in star + contrastive)
    assert star[0] < 1e-6  # step 0: the student is the teacher
    assert max(star) > 1e-3  # and then they part
    assert metric(log, "Star lambda") == pytest.approx([0.7 * (1 - step / 4) for step in range(4)])  # linear, per step
    assert [os.path.basename(p) for p in tiny_run["checkpoints"]] == ["epoch_1.pt", "epoch_2.pt"]
    assert "starft_lambda: 0.7" in open(os.path.join(tiny_run["folder"], "params.txt")).read()

    ckpt_path = tiny_run["checkpoints"][-1]
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["starft"]["starft_lambda"] == 0.7 and ckpt["starft"]["starft_concepts"] == "texture"
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    register_tiny_config(tiny_run)
    model, _, _ = open_clip.create_model_and_transforms("starft-tiny", pretrained=ckpt_path)
    for k, v in model.state_dict().items():
        if k in ckpt["state_dict"]:
            assert torch.equal(v, ckpt["state_dict"][k]), k
    initial, _, _ = open_clip.create_model_and_transforms(tiny_run["model"])
    assert not torch.equal(model.visual.conv1.weight, initial.visual.conv1.weight)  # it trained


@pytest.mark.e2e
def test_two_processes_with_torchrun_on_gloo(ws):
    # "--" keeps torchrun's parser from reading OpenCLIP's --logs as an abbreviation of its --logs-specs
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                "-m", "--", "open_clip_starft.main")
    result = run(train_args(ws, "ddp", "--gather-with-grad", batch_size=16), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "ddp")
    assert "distributed mode with multiple processes" in log and "total 2" in log
    star = metric(log, "Star_loss")
    assert len(star) == 8 and star[0] < 1e-6 and all(math.isfinite(v) for v in star + metric(log, "Contrastive_loss"))
    assert checkpoints(ws, "ddp") == ["epoch_1.pt", "epoch_2.pt"]
    ckpt_path = os.path.join(ws["root"], "logs", "ddp", "checkpoints", "epoch_2.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert all(k.startswith("module.") for k in ckpt["state_dict"])  # upstream saves the DDP state dict
    register_tiny_config(ws)
    model, _, _ = open_clip.create_model_and_transforms("starft-tiny", pretrained=ckpt_path)
    assert torch.equal(model.visual.conv1.weight, ckpt["state_dict"]["module.visual.conv1.weight"])


def test_lambda_zero_is_upstream_contrastive_fine_tuning(small_data, tmp_path):
    """With λ = 0 and captions equal to the shards' own text, the first step's loss is upstream's."""
    ws = workspace(small_data, tmp_path)
    # upstream trains on the shards' txt: write it as exactly our clean caption, "a photo of a {class}."
    shard = os.path.join(ws["root"], "clean", "clean-000000.tar")
    os.makedirs(os.path.dirname(shard))
    with wds.TarWriter(shard) as sink:
        for i in range(64):
            image, cls, _ = render_sample(i, seed=1, image_size=32)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"s{i:04d}", "jpg": buf.getvalue(), "cls": str(cls).encode(),
                        "txt": f"a photo of a {CLASSNAMES[cls]}.".encode()})
    common = ["--train-data", shard, "--train-num-samples", "64", "--dataset-type", "webdataset",
              "--model", ws["model"], "--device", "cpu", "--batch-size", "64", "--epochs", "1", "--workers", "0",
              "--lr", "1e-3", "--seed", "0", "--log-every-n-steps", "1", "--logs", os.path.join(ws["root"], "logs"),
              *NO_CROP]
    ours = run([*common, "--name", "ours", "--starft-lambda", "0", "--starft-classnames", ws["classes"]])
    assert ours.returncode == 0, ours.stderr[-3000:]
    upstream = run_main([*common, "--name", "upstream"], main=open_clip_train.main.main)
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    ours_loss = metric(log_of(ws, "ours"), "Contrastive_loss")[0]
    upstream_loss = metric(log_of(ws, "upstream"), "Contrastive_loss")[0]
    assert ours_loss == pytest.approx(upstream_loss, rel=1e-4)  # both logged with 5 significant digits
    assert metric(log_of(ws, "ours"), "Star_loss")[0] == 0.0


@pytest.mark.e2e
def test_sigkill_after_first_checkpoint_then_resume_latest(ws):
    epochs = 3  # killed after epoch 1's checkpoint: the resume has two epochs left
    uninterrupted = run(train_args(ws, "whole", epochs=epochs))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    whole = log_of(ws, "whole")

    args = train_args(ws, "killed", epochs=epochs)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "open_clip_starft.main", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = os.path.join(ws["root"], "logs", "killed", "checkpoints", "epoch_1.pt")
    deadline = time.time() + 240
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoints(ws, "killed")
    assert "epoch_1.pt" in saved and f"epoch_{epochs}.pt" not in saved, saved
    for name in saved:  # a save cut by the kill stays "*.partial"; every epoch_N.pt is whole
        if name.endswith(".pt"):
            torch.load(os.path.join(ws["root"], "logs", "killed", "checkpoints", name), weights_only=False)

    resumed = run(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = log_of(ws, "killed")
    assert "=> resuming checkpoint" in log
    assert checkpoints(ws, "killed")[-1] == f"epoch_{epochs}.pt"
    assert metric(log, "Step")[-1] == metric(whole, "Step")[-1] == epochs * 4 - 1
    assert metric(log, "Star lambda")[-1] == metric(whole, "Star lambda")[-1]
    # the teacher is still the initial model after the resume
    initial, _, _ = open_clip.create_model_and_transforms(ws["model"])
    prints = [float(v) for v in re.findall(r"teacher fingerprint at epoch \d+: ([0-9.e+]+)", log)]
    assert prints and all(p == pytest.approx(fingerprint(initial), rel=1e-9) for p in prints)


def test_csv_training(small_data, tmp_path):
    ws = workspace(small_data, tmp_path)
    csv_path = write_csv(os.path.join(ws["root"], "csv"), 64, seed=2, image_size=32)
    args = train_args(ws, "csv", epochs=1, workers=0)
    args[args.index("--train-data") + 1] = csv_path
    args[args.index("--dataset-type") + 1] = "csv"
    result = run(args + ["--csv-separator", "\t", "--csv-img-key", "filepath"])
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "csv")
    assert len(metric(log, "Star_loss")) == 2 and metric(log, "Star_loss")[0] < 1e-6


def test_pretrained_file_with_a_named_architecture(small_data, tmp_path):
    ws = workspace(small_data, tmp_path)
    weights = tiny_weights(ws)
    register_tiny_config(ws)  # in this process, where the run below trains
    args = train_args(ws, "pretrained", epochs=1)
    args[args.index("--model") + 1] = "starft-tiny"
    result = run([*args, "--pretrained", weights])
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "pretrained")
    assert f"Loading full pretrained weights from: {weights}" in log
    assert metric(log, "Star_loss")[0] < 1e-6
    initial, _, _ = open_clip.create_model_and_transforms(ws["model"])
    teacher = float(re.search(r"teacher fingerprint at epoch 0: ([0-9.e+]+)", log).group(1))
    assert teacher == pytest.approx(fingerprint(initial), rel=1e-9)  # the teacher holds the pretrained weights


def test_teacher_image_cache_approximation_trains(small_data, tmp_path):
    ws = workspace(small_data, tmp_path)
    result = run(train_args(ws, "imgcache", "--starft-teacher-image-cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "imgcache")
    star = metric(log, "Star_loss")
    assert len(star) == 4 and all(math.isfinite(v) for v in star)
    assert "starft_teacher_image_cache: True" in open(os.path.join(ws["root"], "logs", "imgcache", "params.txt")).read()


def test_bare_resume_weights_are_the_start_and_the_teacher(small_data, tmp_path):
    """upstream loads a model-only --resume file as the starting weights; the step loads it into the teacher too."""
    from open_clip_starft.tools.tiny_model import build_tiny_model
    ws = workspace(small_data, tmp_path)
    other, _ = build_tiny_model(seed=7)
    bare = os.path.join(ws["root"], "bare.pt")
    torch.save(other.state_dict(), bare)
    result = run(train_args(ws, "bare", "--resume", bare, epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "bare")
    assert f"loaded the bare --resume weights {bare} as the zero-shot model" in log
    teacher = float(re.search(r"teacher fingerprint at epoch 0: ([0-9.e+]+)", log).group(1))
    assert teacher == pytest.approx(fingerprint(other), rel=1e-9)
    assert metric(log, "Star_loss")[0] < 1e-6  # step 0: the student (the bare weights) is the teacher
