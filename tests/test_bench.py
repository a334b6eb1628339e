"""The benchmarks keep working: one short run of each writes the records the README quotes."""
import json

import pytest

from open_clip_starft.bench.cli import main
from open_clip_starft.cli import main as cli_main
from open_clip_starft.demo.data import brace_pattern, write_shards

STEP_KEYS = {"model", "device", "batch_size", "precision", "flyp_step_s", "starft_step_s", "naive_step_s",
             "starft_over_flyp", "starft_over_naive", "flop_floor_ratio", "peak_mem_mb"}


@pytest.mark.e2e  # a benchmark: peak memory is read from one fresh process per variant
def test_bench_step_tiny(tmp_path, capsys):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from open_clip_starft.tools.tiny_model import build_tiny_model
    out = tmp_path / "step.json"
    # through the console command's dispatcher, as README gives it
    assert cli_main(["bench", "step", "--model", "tiny", "--batch-size", "4", "--steps", "1", "--out", str(out)]) == 0
    record, = json.loads(out.read_text())
    assert STEP_KEYS <= set(record) and record["loss"] == "ClipLoss"
    # FLOPs are exact counts: the teacher's image forward is the tiny model's, counted here independently
    model, _ = build_tiny_model(0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_image(torch.randn(4, 3, 32, 32))
    assert record["teacher_image_forward_flops"] == counter.get_total_flops() > 0
    # StarFT adds at least the teacher's image forward and the spurious captions' text work; the naive port more
    assert record["naive_flops"] > record["starft_flops"] > record["flyp_flops"] + record["teacher_image_forward_flops"]
    assert "StarFT/FLYP" in capsys.readouterr().out


@pytest.mark.e2e  # a benchmark: peak memory is read from one fresh process per variant
def test_bench_step_siglip_beside_clip_with_accumulation(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["step", "--model", "tiny-siglip", "--beside", "tiny", "--batch-size", "4", "--accum-freq", "2",
                 "--steps", "1", "--out", str(out)]) == 0
    one, = json.loads(out.read_text())
    assert one["loss"] == "SigLipLoss" and one["beside"]["loss"] == "ClipLoss" and one["accum_freq"] == 2
    assert set(one["peak_mem_mb"]) == {"flyp", "starft"} and "naive_step_s" not in one
    # an accumulated FLYP step: the cached pass (forward) + forward and backward of each micro-batch, more
    # than twice a one-micro-batch step's FLOPs (counted here in-process)
    from open_clip_starft.bench.step import StepBench
    assert one["flyp_flops"] > 2 * StepBench("tiny-siglip", 4, "fp32", "cpu", with_teacher=False).flops("flyp")
    assert "beside, same run: tiny (ClipLoss)" in capsys.readouterr().out


def test_bench_data_compares_with_upstream(tmp_path):
    shards = brace_pattern(write_shards(str(tmp_path / "shards"), 256, seed=0, image_size=32, samples_per_shard=64))
    out = tmp_path / "data.json"
    assert main(["data", "--shards", shards, "--workers", "1", "--batch-size", "32", "--image-size", "32",
                 "--epochs", "1", "--out", str(out)]) == 0
    record, = json.loads(out.read_text())
    # both pipelines read every sample once per epoch (same work timed), and the ratio is of the medians
    assert record["samples_per_epoch"] == {"starft": [256], "upstream": [256]}
    assert record["starft_over_upstream"] == record["starft_samples_per_s"] / record["upstream_samples_per_s"]
    assert record["per_epoch"]["starft"] == [record["starft_samples_per_s"]]


def test_stage_runner_logs_times_reports_progress_and_fails_in_one_message(tmp_path):
    import pytest

    from open_clip_starft.tools.stages import run_stage, training_progress
    from open_clip_starft.errors import StarftError

    (tmp_path / "fake_train.py").write_text(
        "import os, sys, time\n"
        "print('threads', os.environ['OMP_NUM_THREADS'], 'args', *sys.argv[1:], flush=True)\n"
        "print('Train Epoch: 1 [  64/128 (50%)] Data (t): 0.001', flush=True)\n"
        "time.sleep(float(os.environ.get('SLEEP', '0')))\n"
        "sys.exit(int(os.environ.get('STATUS', '0')))\n")
    env = {"PYTHONPATH": str(tmp_path)}
    console = tmp_path / "logs" / "run.console.txt"
    polled = []
    seconds = run_stage("fake_train", ["--epochs", "2"], str(console), what="the fake run", threads=3,
                        env={**env, "SLEEP": "0.5"}, on_poll=lambda c: polled.append(training_progress(c)), poll_s=0.1)
    assert seconds >= 0.5 and "threads 3 args --epochs 2" in console.read_text()
    assert polled and polled[-1] == "epoch 2 50%"  # OpenCLIP counts epochs from 0
    with pytest.raises(StarftError, match=r"the fake run failed \(exit 3\); the end of .*run.console.txt:\n.*threads"):
        run_stage("fake_train", [], str(console), what="the fake run", env={**env, "STATUS": "3"})
    with pytest.raises(StarftError, match="the slow run ran past its 1 s limit and was stopped"):
        run_stage("fake_train", [], str(console), what="the slow run", env={**env, "SLEEP": "30"}, timeout=1, poll_s=0.2)
    assert training_progress(str(tmp_path / "missing.txt")) is None


def test_bench_eval_reports_the_validation_overhead(tmp_path, capsys):
    from open_clip_starft.bench.eval_throughput import validation_overhead
    row = {"images_per_s": 100.0, "head_seconds": 2.0, "head_classes": 50}
    cost = validation_overhead(row, train_ips=50.0, val_images=500, train_images=1000, val_classes=10)
    # 500 images at 100/s + a 10-class head (2 s per 50 classes) against 1000 training images at 50/s
    assert cost["val_seconds_per_epoch"] == 5.4 and cost["train_seconds_per_epoch"] == 20.0
    assert cost["val_overhead"] == 5.4 / 20.0
    out = tmp_path / "eval.json"
    assert main(["eval", "--models", "tiny", "--images", "8", "--head-classes", "4", "--templates", "single",
                 "--train-steps", "1", "--train-batch-size", "4", "--val-images", "100", "--train-images", "1000",
                 "--out", str(out)]) == 0
    record, = json.loads(out.read_text())
    assert record["images"] == 8 and record["val_overhead"] == pytest.approx(
        (100 / record["images_per_s"] + record["head_seconds"] * 10 / 4) / (1000 / record["train_images_per_s"]))
    assert "% overhead" in capsys.readouterr().out
