"""scripts/gpu_check.py: its --dry-run runs the GPU check's whole plan on the CPU and writes the records
a GPU run writes (bench step, a StarFT run with --torchcompile, a 2-process run), each one checked."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
MACHINE = {"gpus", "device_name", "cpu_cores", "torch", "date"}


def check(*args, **kw):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.e2e  # a 1-process and a 2-process training run, each started as a process
def test_dry_run_writes_every_record(tmp_path):
    out = tmp_path / "records"
    done = check("--dry-run", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "docs").exists()  # a dry run never writes where GPU records go
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["dry_run"] is True and summary["plan"]["precision"] == "amp_bf16" and summary["plan"]["torchcompile"]
    assert {p: s["status"] for p, s in summary["parts"].items()} == {"step": "ok", "train": "ok", "ddp": "ok"}
    assert summary["seconds"] <= summary["budget_s"]

    step = json.loads((out / "gpu-step.json").read_text())
    assert step["check"] == "step" and step["dry_run"] is True and MACHINE <= set(step)
    bench = step["bench"]
    assert (bench["model"], bench["precision"], bench["batch_size"]) == ("tiny", "amp_bf16", 4)
    for variant in ("flyp", "starft", "naive"):
        assert bench["images_per_s"][variant] > 0 and bench["peak_mem_mb"][variant] > 0
    assert bench["naive_flops"] > bench["starft_flops"] > bench["flyp_flops"]

    for part, processes in (("train", 1), ("ddp", 2)):
        record = json.loads((out / f"gpu-{part}.json").read_text())
        assert record["status"] == "ok" and record["processes"] == processes and MACHINE <= set(record), part
        assert "--torchcompile" in record["command"] and "--precision amp_bf16" in record["command"]
        assert record["losses_finite"] and record["checkpoints"] == ["epoch_1.pt"], part
        assert record["logged_steps"] >= 2 and record["samples_per_s"] > 0
        star = record["losses"]["Star_loss"]
        assert star and all(math.isfinite(v) for v in star) and star[0] < 1e-6  # the teacher is the student at step 0


def script_main():
    """The script's ``main``, loaded from its file (scripts/ is no package): the refusals below are checked
    in this process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_a_gpu_it_says_to_use_dry_run(tmp_path, capsys):
    assert script_main()(["--out", str(tmp_path / "records")]) == 2
    err = capsys.readouterr().err
    assert "--dry-run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "records").exists()


def test_unknown_part_is_a_one_line_error(tmp_path, capsys):
    assert script_main()(["--dry-run", "--parts", "step,warp", "--out", str(tmp_path / "records")]) == 2
    err = capsys.readouterr().err
    assert "--parts 'step,warp'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "records").exists()
