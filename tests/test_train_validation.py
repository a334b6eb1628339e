"""--starft-val during training: robustness metrics of named sets for epoch 0 and every epoch in
results.jsonl, the text log and tensorboard; best.pt holds the best epoch; the numbers equal
``open-clip-starft eval`` on the same checkpoints; 2 processes give the numbers of 1; training is
untouched; a resumed run continues the same log."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.eval.cli import main as eval_main

from runs import log_of, run, train_args, workspace


@pytest.fixture(scope="module")
def ws(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    ws = workspace(small_data, root)
    # a validation set with groups (the demo's shards carry 'group') and a plain folder set without
    ws["val"] = brace_pattern(write_shards(str(root / "val"), 48, seed=21, biased=False, image_size=32,
                                           samples_per_shard=24))
    rng = np.random.default_rng(3)
    for i in range(12):
        folder = root / "plain" / CLASSNAMES[i % len(CLASSNAMES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ws["plain"] = str(root / "plain")
    return ws


def val_args(ws, *extra):
    return ["--starft-val", f"val={ws['val']}", "--starft-val", f"plain={ws['plain']}",
            "--starft-select", "val:worst_group", *extra]


def results(ws, name):
    with open(os.path.join(ws["root"], "logs", name, "checkpoints", "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_validation_sets_are_logged_every_epoch_and_the_best_is_kept(ws, tmp_path):
    name = "val-run"
    done = run(train_args(ws, name, *val_args(ws, "--starft-val-steps", "1", "--report-to", "tensorboard")))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = results(ws, name)
    epoch_ends = [r for r in lines if r["epoch"] in (0, 1, 2)]
    assert [(r["epoch"], r["set"]) for r in epoch_ends] == [(e, s) for e in (0, 1, 2) for s in ("val", "plain")]
    assert {r["step"] for r in epoch_ends if r["epoch"] == 0} == {0}
    mid = [r for r in lines if r["epoch"] not in (0, 1, 2)]  # every step but an epoch's last (2 steps an epoch)
    assert [r["step"] for r in mid if r["set"] == "val"] == [1, 3] and all(0 < r["epoch"] < 2 for r in mid)
    for r in lines:
        assert set(r) >= {"top1", "top5", "worst_group", "avg_group", "ece", "per_class_mean", "groups", "n"}
        assert r["n"] == (48 if r["set"] == "val" else 12)
    assert all(len(r["groups"]) > 1 for r in lines if r["set"] == "val")

    log = log_of(ws, name)
    assert "StarFT val epoch 0 step 0: val/val/top1:" in log and "val/plain/worst_group" in log

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(ws["root"], "logs", name, "tensorboard"))
    events.Reload()
    assert "val/val/worst_group" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("val/val/worst_group")] == [0, 1, 2, 3, 4]

    # best.pt: the epoch (1 or 2) with the best validation worst group, ties broken by top-1
    candidates = [r for r in epoch_ends if r["set"] == "val" and r["epoch"] > 0]
    best = max(candidates, key=lambda r: (r["worst_group"], r["top1"]))
    folder = os.path.join(ws["root"], "logs", name, "checkpoints")
    checkpoint = torch.load(os.path.join(folder, "best.pt"), weights_only=True)
    assert checkpoint["starft_best"]["epoch"] == best["epoch"] and checkpoint["epoch"] == best["epoch"]
    assert checkpoint["starft_best"]["value"] == best["worst_group"]
    epoch_file = torch.load(os.path.join(folder, f"epoch_{best['epoch']}.pt"), weights_only=True)
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in epoch_file["state_dict"].items())
    assert not [f for f in os.listdir(folder) if ".partial" in f]

    # the same numbers as `open-clip-starft eval` on the epoch checkpoints, at the run's precision
    # (upstream's default, amp: validation scores as training runs)
    out = tmp_path / "eval.jsonl"
    assert eval_main(["--model", ws["model"], "--run", os.path.join(ws["root"], "logs", name), "--epochs", "1,2",
                      "--set", f"val={ws['val']}", "--classnames", ws["classes"], "--out", str(out), "--no-plots",
                      "--workers", "0", "--device", "cpu", "--precision", "amp", "--batch-size", "32"]) == 0
    offline = [json.loads(line) for line in out.read_text().splitlines()]
    for record in offline:
        epoch = int(record["checkpoint"].split("_")[-1])
        online = next(r for r in epoch_ends if r["epoch"] == epoch and r["set"] == "val")
        for key in ("top1", "worst_group", "avg_group", "per_class_mean", "n"):
            assert record[key] == online[key], (epoch, key)
        assert record["ece"] == online["ece"]

    # the kept epoch by name: eval --epochs best, and export of best.pt as a plain OpenCLIP folder
    out = tmp_path / "best.jsonl"
    assert eval_main(["--model", ws["model"], "--run", os.path.join(ws["root"], "logs", name), "--epochs", "best",
                      "--set", f"val={ws['val']}", "--classnames", ws["classes"], "--out", str(out), "--no-plots",
                      "--workers", "0", "--device", "cpu", "--precision", "amp", "--batch-size", "32"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["checkpoint"] == f"{name}/best" and record["worst_group"] == best["worst_group"]
    from open_clip_starft.tools.export import main as export_main
    assert export_main(["--checkpoint", os.path.join(folder, "best.pt"), "--model", ws["model"],
                        "--out", str(tmp_path / "best-model")]) == 0
    assert (tmp_path / "best-model" / "open_clip_config.json").exists()


def test_validation_does_not_change_training(ws):
    plain = run(train_args(ws, "no-val", epochs=2))
    scored = run(train_args(ws, "with-val", *val_args(ws), epochs=2))
    assert plain.returncode == 0 and scored.returncode == 0, scored.stderr[-3000:]
    a = torch.load(os.path.join(ws["root"], "logs", "no-val", "checkpoints", "epoch_2.pt"), weights_only=True)
    b = torch.load(os.path.join(ws["root"], "logs", "with-val", "checkpoints", "epoch_2.pt"), weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.e2e
def test_two_processes_score_the_numbers_of_one(ws, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                "-m", "--", "open_clip_starft.main")
    two = run(train_args(ws, "val-ddp", *val_args(ws), "--gather-with-grad", epochs=1, batch_size=16), launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    # epoch 0 is the zero-shot model: one process (eval, at the run's precision) must give the same numbers
    out = tmp_path / "zero-shot.jsonl"
    assert eval_main(["--model", ws["model"], "--set", f"val={ws['val']}", "--set", f"plain={ws['plain']}",
                      "--classnames", ws["classes"], "--out", str(out), "--no-plots", "--workers", "0",
                      "--device", "cpu", "--precision", "amp", "--batch-size", "16"]) == 0
    zero = {r["dataset"]: r for r in map(json.loads, out.read_text().splitlines())}
    scored = [r for r in results(ws, "val-ddp") if r["epoch"] == 0]
    assert sorted(r["set"] for r in scored) == ["plain", "val"]
    for r in scored:
        for key in ("top1", "worst_group", "avg_group", "per_class_mean", "groups", "n"):
            assert r[key] == zero[r["set"]][key], (r["set"], key)
        assert r["ece"] == pytest.approx(zero[r["set"]]["ece"], abs=1e-6)


def test_a_bad_validation_set_or_selection_is_one_line_before_training(ws):
    done = run(train_args(ws, "bad-val", "--starft-val", f"val={ws['root']}/missing", epochs=1))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr and last.startswith("open-clip-starft: error: ")
    assert "missing" in last and "does not exist" in last and "Train Epoch" not in done.stderr
    done = run(train_args(ws, "bad-select", *val_args(ws)[:4], "--starft-select", "test:worst_group", epochs=1))
    assert done.returncode == 2 and "--starft-select 'test:worst_group'" in done.stderr.strip().splitlines()[-1]


def test_a_resumed_run_continues_the_same_log_and_the_best_so_far(ws):
    name = "val-resume"
    first = run(train_args(ws, name, *val_args(ws), epochs=1))
    assert first.returncode == 0, first.stderr[-3000:]
    best_before = json.loads(open(os.path.join(ws["root"], "logs", name, "checkpoints", "best.json")).read())
    assert best_before["epoch"] == 1
    more = run(train_args(ws, name, *val_args(ws), "--resume", "latest", "--starft-allow-changed-settings", epochs=2))
    assert more.returncode == 0, more.stderr[-3000:]
    lines = results(ws, name)
    assert [(r["epoch"], r["set"]) for r in lines] == [(e, s) for e in (0, 1, 2) for s in ("val", "plain")]
    best = torch.load(os.path.join(ws["root"], "logs", name, "checkpoints", "best.pt"), weights_only=True)
    val = {r["epoch"]: r for r in lines if r["set"] == "val"}
    winner = max((1, 2), key=lambda e: (val[e]["worst_group"], val[e]["top1"]))  # epoch 1 counts after the resume
    assert best["starft_best"]["epoch"] == winner
