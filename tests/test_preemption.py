"""SIGUSR1/SIGTERM mid-epoch: a checkpoint, exit 0, and --resume latest finishes the same run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from runs import PATCHES, SCRIPTS, checkpoints, log_of, metric, patched_copy, slurm_env, train_args, workspace

EPOCHS, STEPS_PER_EPOCH = 2, 16  # 128 samples, batch 8

pytestmark = pytest.mark.e2e  # signals sent to real training processes


@pytest.fixture(scope="module")
def ws(tiny_data, tmp_path_factory):
    return workspace(tiny_data, tmp_path_factory.mktemp("preempt"))


def wait_for_step(ws, name, proc, step, timeout=240):
    path = os.path.join(ws["root"], "logs", name, "out.log")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and f"Step: {step} " in open(path).read():
            return
        time.sleep(0.05)
    raise AssertionError(f"run {name} never logged step {step}")


@pytest.mark.parametrize("sig,host", [(signal.SIGUSR1, "runtime-hooks"), (signal.SIGTERM, "runtime-hooks"),
                                      (signal.SIGUSR1, "plugin-hook")])
def test_signal_mid_epoch_saves_exits_zero_and_resume_finishes(ws, sig, host, tmp_path):
    """Through our runtime hooks, and through OpenCLIP's plugin loop (patches/0003, StarftStep.after_step)."""
    name = f"sig{int(sig)}-{host}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if host == "plugin-hook":
        env["PYTHONPATH"] = str(patched_copy(tmp_path, [p for p in PATCHES if "plugin-hook" in p]))
    args = train_args(ws, name, batch_size=8, epochs=EPOCHS)
    proc = subprocess.Popen([sys.executable, "-m", "open_clip_starft.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    wait_for_step(ws, name, proc, 2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by a signal" in stderr and "--resume latest" in stderr
    saved = checkpoints(ws, name)
    assert len(saved) == 1 and re.fullmatch(r"epoch_0_step_\d+\.pt", saved[0]), saved
    done = int(re.search(r"step_(\d+)", saved[0]).group(1))
    assert 3 <= done < STEPS_PER_EPOCH  # mid-epoch: after the step the signal arrived in
    first = log_of(ws, name)
    assert metric(first, "Step")[-1] == done - 1  # the interrupted step's loss line is logged before the save
    assert first.index(f"Step: {done - 1} ") < first.index(f"saved {os.path.join(ws['root'], 'logs', name)}")
    if sig == signal.SIGTERM:
        return  # SIGTERM sets the same flag as SIGUSR1: the resume below is the SIGUSR1 cases' (time saved)

    resumed = subprocess.run([sys.executable, "-m", "open_clip_starft.main", *args, "--resume", "latest"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = log_of(ws, name)
    assert ("plugin hook (patches/0003)" in log) == (host == "plugin-hook")
    steps = metric(log, "Step")
    assert steps[-1] == EPOCHS * STEPS_PER_EPOCH - 1  # the same step count as an uninterrupted run
    resumed_steps = steps[steps.index(done):]  # after the resume: each remaining step exactly once
    assert resumed_steps == list(range(done, EPOCHS * STEPS_PER_EPOCH))
    assert checkpoints(ws, name)[-1] == f"epoch_{EPOCHS}.pt"


def test_sbatch_script_forwards_usr1_and_requeues(ws, tmp_path):
    env = slurm_env(ws, tmp_path, "requeue", 29614)
    del env["SLURM_NTASKS"]
    env["EXTRA_ARGS"] = env["EXTRA_ARGS"].replace("--batch-size 16 --epochs 1", "--batch-size 8 --epochs 2")
    proc = subprocess.Popen(["bash", os.path.join(SCRIPTS, "train_1node.sbatch")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(ws, "requeue", proc, 1)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 4242"
    assert any(re.fullmatch(r"epoch_\d+_step_\d+\.pt", c) for c in checkpoints(ws, "requeue")), checkpoints(ws, "requeue")


RECORD_KEYS = """
import json, os, sys
from open_clip_starft.host import step as host_step
call = host_step.StarftStep.__call__

def record(self, model, batch, loss, args, *, step, epoch, num_batches_per_epoch):
    with open(os.environ["BATCH_KEYS"], "a") as f:
        f.write(json.dumps([step, list(host_step.Batch.of(batch).sample_ids)]) + "\\n")
    return call(self, model, batch, loss, args, step=step, epoch=epoch, num_batches_per_epoch=num_batches_per_epoch)

host_step.StarftStep.__call__ = record
from open_clip_starft.main import main
sys.exit(main(sys.argv[1:]))
"""


def batch_keys(path):
    """{global step: the sample ids (shard URL/key) of its batch}, from RECORD_KEYS's file."""
    keys = {}
    for line in open(path):
        step, ids = json.loads(line)
        assert step not in keys, f"step {step} trained twice"
        keys[step] = ids
    return keys


def test_a_preempted_and_resumed_run_trains_on_exactly_the_batches_of_an_uninterrupted_one(ws, tmp_path):
    """Step-exact data on resume: every batch's sample keys, interrupted (SIGUSR1 mid-epoch) vs not.
    The teacher image cache is on only because it makes each batch carry its samples' ids."""
    def launch(name, keys, *extra):
        args = train_args(ws, name, "--starft-teacher-image-cache", *extra, batch_size=8, epochs=EPOCHS)
        env = dict(os.environ, OMP_NUM_THREADS="1", BATCH_KEYS=str(keys))
        return subprocess.Popen([sys.executable, "-c", RECORD_KEYS, *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    whole = launch("keys-whole", tmp_path / "whole.jsonl")
    _, stderr = whole.communicate(timeout=300)
    assert whole.returncode == 0, stderr[-3000:]
    proc = launch("keys-cut", tmp_path / "cut.jsonl")
    wait_for_step(ws, "keys-cut", proc, 4)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by a signal" in stderr, stderr[-3000:]
    assert re.fullmatch(r"epoch_0_step_\d+\.pt", checkpoints(ws, "keys-cut")[0])
    resumed = launch("keys-cut", tmp_path / "cut.jsonl", "--resume", "latest")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming epoch 0 after batch" in log_of(ws, "keys-cut")

    expected, got = batch_keys(tmp_path / "whole.jsonl"), batch_keys(tmp_path / "cut.jsonl")
    assert sorted(expected) == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert got == expected


def test_save_most_recent_resumes_from_the_preemption_checkpoint(ws):
    """--save-most-recent: upstream's --resume latest looks only at epoch_latest.pt (epoch 1 here) and
    would retrain the steps done before the signal; the preemption checkpoint holds more."""
    name = "most-recent"
    args = train_args(ws, name, "--save-most-recent", "--save-frequency", "0", batch_size=8, epochs=EPOCHS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "open_clip_starft.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    wait_for_step(ws, name, proc, STEPS_PER_EPOCH + 2)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by a signal" in stderr, stderr[-3000:]
    saved = checkpoints(ws, name)
    step_file = [c for c in saved if re.fullmatch(r"epoch_1_step_\d+\.pt", c)]
    assert "epoch_latest.pt" in saved and len(step_file) == 1, saved
    done = int(re.search(r"step_(\d+)", step_file[0]).group(1))
    resumed = subprocess.run([sys.executable, "-m", "open_clip_starft.main", *args, "--resume", "latest"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = log_of(ws, name)
    assert f"Found latest resume checkpoint at {os.path.join(ws['root'], 'logs', name, 'checkpoints', step_file[0])}" in log
    assert f"resuming epoch 1 after batch {done}" in log
    steps = metric(log, "Step")
    assert steps == list(range(EPOCHS * STEPS_PER_EPOCH))  # each step once: none retrained, none skipped
