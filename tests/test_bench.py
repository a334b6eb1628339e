"""The benchmarks keep working: one short run of each writes the records the README quotes."""
import json

from open_clip_starft.bench.cli import main
from open_clip_starft.cli import main as cli_main
from open_clip_starft.demo.data import brace_pattern, write_shards

STEP_KEYS = {"model", "device", "batch_size", "precision", "flyp_step_s", "starft_step_s", "naive_step_s",
             "starft_over_flyp", "starft_over_naive", "flop_floor_ratio", "peak_mem_mb"}


def test_bench_step_tiny(tmp_path, capsys):
    out = tmp_path / "step.json"
    # through the console command's dispatcher, as README gives it
    assert cli_main(["bench", "step", "--model", "tiny", "--batch-size", "4", "--steps", "1", "--out", str(out)]) == 0
    record, = json.loads(out.read_text())
    assert STEP_KEYS <= set(record)
    # FLOPs are exact counts: StarFT adds the teacher's image forward and the spurious-caption text work
    assert record["naive_flops"] > record["starft_flops"] > record["flyp_flops"] + record["teacher_image_forward_flops"]
    assert record["flop_floor_ratio"] == (record["flyp_flops"] + record["teacher_image_forward_flops"]) / record["flyp_flops"]
    assert "StarFT/FLYP" in capsys.readouterr().out


def test_bench_data_compares_with_upstream(tmp_path):
    shards = brace_pattern(write_shards(str(tmp_path / "shards"), 256, seed=0, image_size=32, samples_per_shard=64))
    out = tmp_path / "data.json"
    assert main(["data", "--shards", shards, "--workers", "1", "--batch-size", "32", "--image-size", "32",
                 "--epochs", "1", "--out", str(out)]) == 0
    record, = json.loads(out.read_text())
    assert record["starft_samples_per_s"] > 0 and record["upstream_samples_per_s"] > 0


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
