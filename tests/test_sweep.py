import json
import os

import pytest

from open_clip_starft.errors import StarftError
from open_clip_starft.tools import sweep

from runs import sweep_workspace


def _row(name, lam, val_wg, val_id, test_wg, test_id):
    return {"name": name, "method": "flyp" if lam == 0 else "starft", "lam": lam, "val_worst_group": val_wg,
            "val_in_dist": val_id, "val_avg": 0.5, "worst_group": test_wg, "in_dist": test_id, "avg": 0.5}


def test_select_picks_on_validation_where_test_disagrees():
    rows = [_row("flyp", 0, 0.9, 0.9, 0.9, 0.9),            # FLYP is never the StarFT choice
            _row("a", 1, 0.50, 0.80, 0.95, 0.99),           # the best on test ...
            _row("b", 2, 0.70, 0.70, 0.10, 0.10),           # ... but b is the best on validation
            _row("c", 4, 0.70, 0.60, 0.99, 0.99)]           # tie with b on val WG: b has the higher val in-dist
    assert sweep.select(rows)["name"] == "b"
    # the choice reads no test field: without them it is the same
    blind = [{k: v for k, v in r.items() if k not in ("worst_group", "in_dist", "avg")} for r in rows]
    assert sweep.select(blind)["name"] == "b"
    # full tie: the earlier grid setting; without a val in-dist set, val accuracy breaks the tie
    tied = [_row("x", 1, 0.7, None, 0, 0), _row("y", 2, 0.7, None, 1, 1)]
    tied[1]["val_avg"] = 0.6
    assert sweep.select(tied)["name"] == "y"
    with pytest.raises(StarftError, match="no StarFT setting"):
        sweep.select([_row("flyp", 0, 1, 1, 1, 1)])


def test_grid_names_flags_and_refused_flags():
    grid = sweep.make_grid([0.5, 2], ["linear", "constant"], ["background", "/x/my set.txt"])
    assert len(grid) == 1 + 2 * 2 * 2 and grid[0].name == "flyp" and grid[0].train_args() == ["--starft-lambda", "0"]
    assert grid[1].name == "starft-lam0.5-linear-background"
    assert grid[2].name == "starft-lam0.5-linear-my_set"
    assert grid[-1].train_args() == ["--starft-lambda", "2", "--starft-schedule", "constant",
                                     "--starft-concepts", "/x/my set.txt"]
    with pytest.raises(StarftError, match="share the run name"):
        sweep.make_grid([1], ["linear"], ["a/b.txt", "c/b.txt"])
    assert sweep.train_epochs(["--epochs", "3", "--lr", "1e-3"]) == 3
    with pytest.raises(StarftError, match="--name after '--'"):
        sweep.train_epochs(["--name", "x"])
    with pytest.raises(StarftError, match="finite"):
        sweep.parse_floats("1,inf", "--lambdas")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return sweep_workspace(tmp_path_factory.mktemp("sweep"), {
        "train": (64, 1, True), "val": (64, 2, False), "val_id": (32, 3, True), "test": (64, 4, False),
        "test_id": (32, 5, True)})


@pytest.mark.e2e  # trains in real processes (the stage runner)
def test_sweep_miniature_runs_chooses_on_validation_and_reuses_finished_runs(workspace, capsys):
    ws = workspace
    out = ws["root"] / "out"
    argv = ["--out", str(out), "--model", ws["model"], "--classnames", ws["classes"], "--val", ws["val"],
            "--val-in-dist", ws["val_id"], "--test", ws["test"], "--test-in-dist", ws["test_id"],
            "--lambdas", "1,4", "--schedules", "constant", "--concepts", "background", "--wise-alphas", "0,0.5,1",
            "--device", "cpu", "--",
            "--train-data", ws["train"], "--dataset-type", "webdataset", "--device", "cpu", "--workers", "0",
            "--precision", "fp32", "--batch-size", "32", "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--seed", "0"]
    # a job-array task trains its one setting and evaluates nothing; the choosing sweep then reads it
    only = lambda i: argv[:argv.index("--")] + ["--only-run", str(i)] + argv[argv.index("--"):]  # noqa: E731
    assert sweep.main(only(2)) == 0
    assert (out / "runs" / "starft-lam4-constant-background" / "checkpoints" / "epoch_1.pt").is_file()
    assert not (out / "runs" / "flyp").exists() and not (out / "sweep.json").exists()
    assert sweep.main(only(3)) == 2  # outside the grid of 3
    capsys.readouterr()
    assert sweep.main(argv) == 0
    printed = capsys.readouterr()  # progress on stderr; the command's output, the grid's table, on stdout
    assert printed.err.count("finished run found with the same settings, not rerun") == 1
    table = printed.out
    result = json.loads((out / "sweep.json").read_text())
    rows = result["grid"]
    assert [r["name"] for r in rows] == ["zero-shot", "flyp", "starft-lam1-constant-background",
                                         "starft-lam4-constant-background"]
    for r in rows:
        for key in ("val_avg", "val_worst_group", "val_in_dist", "avg", "worst_group", "in_dist"):
            assert 0 <= r[key] <= 1
        assert r["worst_group"] <= r["avg"] + 1e-9
    starft = [r for r in rows if r["method"] == "starft"]
    best = max(starft, key=lambda r: (r["val_worst_group"], r["val_in_dist"]))
    assert [r["name"] for r in rows if r["selected"]] == [best["name"]] == [result["selected"]]
    assert f"{best['name']} *" in table and f"{rows[0]['val_worst_group']:.3f}" in table.splitlines()[1]
    # WiSE-FT: α 0 is the zero-shot model and α 1 the fine-tuned one, evaluated again through interpolation
    flyp_curve = result["wise"]["flyp"]
    assert [p["alpha"] for p in flyp_curve] == [0.0, 0.5, 1.0]
    for key in ("worst_group", "in_dist", "avg"):
        assert flyp_curve[0][key] == pytest.approx(rows[0][key])
        assert flyp_curve[-1][key] == pytest.approx(rows[1][key])
    assert flyp_curve[1]["val_worst_group"] is None  # the curves are evaluated on the test sets only
    f = result["frontier"]
    assert f["starft_minus_flyp"] == pytest.approx(best["worst_group"] - rows[1]["worst_group"])
    assert f["starft_minus_wise"] == pytest.approx(best["worst_group"] - f["wise_matched_worst_group"])
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun reads the finished runs and the cached evaluations: nothing is trained again
    stamps = {n: os.path.getmtime(out / "runs" / n / "checkpoints" / "epoch_1.pt") for n in ("flyp", best["name"])}
    capsys.readouterr()
    assert sweep.main(argv) == 0
    assert capsys.readouterr().err.count("finished run found with the same settings, not rerun") == 3
    assert stamps == {n: os.path.getmtime(out / "runs" / n / "checkpoints" / "epoch_1.pt") for n in stamps}
    assert json.loads((out / "sweep.json").read_text())["grid"] == rows


def test_sweep_refuses_pretrained_with_local_dir(workspace, capsys):
    ws = workspace
    assert sweep.main(["--out", "x", "--model", ws["model"], "--pretrained", "w.pt", "--classnames", ws["classes"],
                       "--val", ws["val"]]) == 2
    assert "--pretrained with a local-dir" in capsys.readouterr().err


RUNNER = """
import os, signal, sys, types
# the real stage runner, without the package's __init__ (it imports open_clip and torch: seconds per process)
package = types.ModuleType("open_clip_starft")
package.__path__ = [os.environ["PACKAGE_DIR"]]
sys.modules["open_clip_starft"] = package
from open_clip_starft.tools.stages import run_stage
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may start with SIGINT ignored
run_stage("fake_training", [], sys.argv[1], what="fake training", poll_s=0.1, grace_s=5)
"""
FAKE_TRAINING = """
import os, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # like a data loader worker
def saved(*_):
    open(os.environ["SAVED"], "w").write("saved")  # a training's preemption save
    sys.exit(0)
signal.signal(signal.SIGTERM, saved)
open(os.environ["PIDS"], "w").write(f"{os.getpid()} {worker.pid}")
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _start_runner(folder):
    """A stage runner in a subprocess, running the fake training from ``folder``."""
    import subprocess
    import sys

    folder.mkdir()
    (folder / "fake_training.py").write_text(FAKE_TRAINING)
    (folder / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.path.dirname(os.path.dirname(__file__)),
                                                        os.environ.get("PYTHONPATH", "")]),
           "PIDS": str(folder / "pids"), "SAVED": str(folder / "saved"),
           "PACKAGE_DIR": os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__)))}
    return subprocess.Popen([sys.executable, str(folder / "runner.py"), str(folder / "console.txt")], env=env)


def _started(runner, folder) -> list[int]:
    """The pids of the fake training and its worker, once it runs."""
    import time

    pids, deadline = folder / "pids", time.time() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.time() < deadline and runner.poll() is None, "the fake training never started"
        time.sleep(0.05)
    return [int(p) for p in pids.read_text().split()]


def _wait_gone(pids, seconds=5.0):
    import time

    deadline = time.time() + seconds
    while not all(_gone(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
def test_killed_sweep_leaves_no_training_and_an_interrupt_stops_its_whole_group(tmp_path):
    import signal

    cases = ("killed", "interrupted", "terminated")
    runners = {case: _start_runner(tmp_path / case) for case in cases}
    pids = {case: _started(runners[case], tmp_path / case) for case in cases}
    try:
        # kill -9 of the runner: its training child dies with it (PR_SET_PDEATHSIG)
        child = pids["killed"][0]
        assert not _gone(child) and os.getpgid(child) == child != os.getpgid(runners["killed"].pid)  # own group
        runners["killed"].kill()
        runners["killed"].wait()
        assert _wait_gone([child]) == []
        # Ctrl-C, or a scheduler's SIGTERM to the runner: passed on to the whole group, so the training saves
        # and its worker ends, then the runner exits
        runners["interrupted"].send_signal(signal.SIGINT)
        runners["terminated"].send_signal(signal.SIGTERM)
        for case in ("interrupted", "terminated"):
            assert runners[case].wait(timeout=30) != 0
            assert _wait_gone(pids[case]) == []
            assert (tmp_path / case / "saved").read_text() == "saved"
    finally:
        for pid in (p for both in pids.values() for p in both):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e  # trains in real processes (the stage runner)
def test_sweep_can_choose_the_epoch_from_the_runs_logged_validation(workspace):
    ws = workspace
    out = ws["root"] / "out-epoch"
    argv = ["--out", str(out), "--model", ws["model"], "--classnames", ws["classes"], "--val", ws["val"],
            "--val-in-dist", ws["val_id"], "--test", ws["test"], "--lambdas", "2", "--schedules", "constant",
            "--no-flyp", "--choose-epoch", "--device", "cpu", "--",
            "--train-data", ws["train"], "--dataset-type", "webdataset", "--device", "cpu", "--workers", "0",
            "--precision", "fp32", "--batch-size", "32", "--epochs", "2", "--lr", "1e-3", "--warmup", "1", "--seed", "0"]
    assert sweep.main(argv) == 0
    (row,) = [r for r in json.loads((out / "sweep.json").read_text())["grid"] if r["method"] == "starft"]
    folder = out / "runs" / row["name"] / "checkpoints"
    logged = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    val = {r["epoch"]: r for r in logged if r["set"] == "val"}
    val_id = {r["epoch"]: r for r in logged if r["set"] == "val_in_dist"}
    assert sorted(val) == [0, 1, 2]  # the zero-shot model and both epochs, logged by the run itself
    kept = max((1, 2), key=lambda e: (val[e]["worst_group"], val[e]["top1"]))
    assert row["epoch"] == kept and row["checkpoint"] == str(folder / "best.pt")
    assert row["val_worst_group"] == val[kept]["worst_group"] and row["val_avg"] == val[kept]["top1"]
    assert row["val_in_dist"] == val_id[kept]["top1"]
    # the test set is scored on the kept epoch's weights: the same as evaluating best.pt directly
    scorer = sweep.WeightsScorer(ws["model"], None, {"test": ws["test"]}, ws["classes"])
    assert scorer(scorer.state_dict(str(folder / "best.pt")), ("test",))["worst_group"] == row["worst_group"]
