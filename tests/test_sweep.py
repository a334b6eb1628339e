import json
import os

import pytest

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.tools.tiny_model import write_tiny_model
from open_clip_starft.errors import StarftError
from open_clip_starft.tools import sweep


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
    root = tmp_path_factory.mktemp("sweep")
    shards = lambda name, n, seed, biased: brace_pattern(write_shards(  # noqa: E731
        str(root / name), n, seed=seed, biased=biased, image_size=32, samples_per_shard=n // 2, prefix=name))
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSNAMES) + "\n")
    return {"root": root, "model": write_tiny_model(str(root / "model"), seed=0), "classes": str(classes),
            "train": shards("train", 64, 1, True), "val": shards("val", 64, 2, False),
            "val_id": shards("val_id", 32, 3, True), "test": shards("test", 64, 4, False),
            "test_id": shards("test_id", 32, 5, True)}


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
    assert capsys.readouterr().out.count("finished run found, not rerun") == 1
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
    assert capsys.readouterr().out.count("finished run found, not rerun") == 3
    assert stamps == {n: os.path.getmtime(out / "runs" / n / "checkpoints" / "epoch_1.pt") for n in stamps}
    assert json.loads((out / "sweep.json").read_text())["grid"] == rows


def test_sweep_refuses_pretrained_with_local_dir(workspace, capsys):
    ws = workspace
    assert sweep.main(["--out", "x", "--model", ws["model"], "--pretrained", "w.pt", "--classnames", ws["classes"],
                       "--val", ws["val"]]) == 2
    assert "--pretrained with a local-dir" in capsys.readouterr().err
