"""A sweep rerun into the same --out reuses a run only when it was trained with the settings asked for now,
and a cached score only when it was computed from the same weights on the same sets; anything else is
refused in one line naming the difference, or with --on-mismatch rerun trained and evaluated again."""
import hashlib
import json
import os
import pathlib
import re
import shutil

import pytest

from open_clip_starft.demo.data import CLASSNAMES
from open_clip_starft.tools import sweep

from runs import sweep_workspace

RUN = "starft-lam1-constant-background"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return sweep_workspace(tmp_path_factory.mktemp("reuse"), {
        "train": (64, 1, True), "val": (32, 2, False), "val2": (32, 3, False)}, models={"other_model": 1})


def argv(ws, out, *extra, lr="1e-3", model=None, val=None):
    return ["--out", str(out), "--model", model or ws["model"], "--classnames", str(ws["classes"]),
            "--val", val or ws["val"], "--lambdas", "1", "--schedules", "constant", "--no-flyp", "--device", "cpu",
            *extra, "--", "--train-data", ws["train"], "--dataset-type", "webdataset", "--device", "cpu",
            "--workers", "0", "--precision", "fp32", "--batch-size", "32", "--epochs", "1", "--lr", lr,
            "--warmup", "1", "--seed", "0"]


def refused(capsys, args) -> str:
    """Run the sweep, expect exit 2, return its one error line."""
    capsys.readouterr()
    assert sweep.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def stamp(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def params(run_dir):
    return dict(line.rstrip("\n").split(": ", 1) for line in open(os.path.join(run_dir, "params.txt")) if ": " in line)


@pytest.mark.e2e  # trains in real processes (the stage runner)
def test_rerun_reuses_only_equal_settings_refuses_or_retrains_the_rest(ws, capsys):
    out = ws["root"] / "out"
    ckpt = out / "runs" / RUN / "checkpoints" / "epoch_1.pt"
    assert sweep.main(argv(ws, out)) == 0
    first, console, evals = stamp(ckpt), stamp(out / "runs" / f"{RUN}.console.txt"), stamp(out / "evals.json")
    result = json.loads((out / "sweep.json").read_text())

    # identical rerun: the run and its scores are reused (same checkpoint file, console and cache untouched)
    capsys.readouterr()
    assert sweep.main(argv(ws, out)) == 0
    assert "finished run found with the same settings, not rerun" in capsys.readouterr().err
    assert stamp(ckpt) == first and stamp(out / "runs" / f"{RUN}.console.txt") == console
    assert stamp(out / "evals.json") == evals
    assert json.loads((out / "sweep.json").read_text())["grid"] == result["grid"]

    # other settings: refused in one line naming the difference, before anything is trained
    assert "lr 0.001 (now 0.002)" in refused(capsys, argv(ws, out, lr="2e-3"))
    err = refused(capsys, argv(ws, out, model=ws["other_model"]))
    # a long path is shown by its last 60 characters ("…" before them): the tails of both models
    old, new = (ws[k][-40:] for k in ("model", "other_model"))
    assert re.search(rf"model \S*{re.escape(old)} \(now \S*{re.escape(new)}\)", err) and "content of model" in err, err
    classes = pathlib.Path(ws["classes"])
    original = classes.read_text()
    classes.write_text("\n".join(reversed(CLASSNAMES)) + "\n")  # same file, class names reordered
    try:
        assert "content of starft_classnames" in refused(capsys, argv(ws, out))
    finally:
        classes.write_text(original)
    assert "sets.val.root" in refused(capsys, argv(ws, out, val=ws["val2"]))  # runs match; the cached scores do not
    assert stamp(ckpt) == first and not (out / "stale").exists()

    # --on-mismatch rerun: the old run is moved aside, the new settings trained, and the scores are the new run's
    old_sha = sha(ckpt)
    assert sweep.main(argv(ws, out, "--on-mismatch", "rerun", lr="2e-3")) == 0
    assert f"moved to {out / 'stale' / RUN}.1, trained again" in capsys.readouterr().err
    assert params(out / "runs" / RUN)["lr"] == "0.002" and params(out / "stale" / f"{RUN}.1")["lr"] == "0.001"
    assert sha(out / "stale" / f"{RUN}.1" / "checkpoints" / "epoch_1.pt") == old_sha != sha(ckpt)
    cached = json.loads((out / "evals.json").read_text())[f"{RUN}@None"]
    assert cached["key"]["checkpoint"] == sha(ckpt)
    row = next(r for r in json.loads((out / "sweep.json").read_text())["grid"] if r["name"] == RUN)
    assert {k: row[k] for k in cached["metrics"]} == cached["metrics"]

    # a checkpoint replaced since the sweep trained it is not trusted either
    shutil.copyfile(out / "stale" / f"{RUN}.1" / "checkpoints" / "epoch_1.pt", ckpt)
    assert "epoch_1.pt replaced since this sweep trained it" in refused(capsys, argv(ws, out, lr="2e-3"))


def test_missing_inputs_are_named_before_training(ws, capsys, tmp_path):
    out = tmp_path / "out"
    missing = str(tmp_path / "nowhere-{000000..000001}.tar")
    assert "--test-in-dist" in refused(capsys, argv(ws, out, "--test-in-dist", missing))
    assert str(tmp_path / "nowhere") in refused(capsys, argv(ws, out, "--test", str(tmp_path / "nowhere")))
    assert "--classnames" in refused(capsys, [a if a != str(ws["classes"]) else str(tmp_path / "c.txt")
                                              for a in argv(ws, out)])
    assert "--concepts" in refused(capsys, argv(ws, out, "--concepts", str(tmp_path / "mine.txt")))
    args = argv(ws, out)
    args[args.index("--train-data") + 1] = missing
    assert "nowhere-000000.tar" in refused(capsys, args)
    assert not (out / "runs").exists()


def test_unfinished_run_newer_flags_and_old_caches_are_compared_too(ws, tmp_path):
    from open_clip_starft.errors import ConfigError
    from open_clip_starft.tools.sweep_reuse import content_of, expected_params, record_run

    out = tmp_path / "out"
    ctx = sweep.context_of(sweep.build_parser().parse_args(argv(ws, out)), None)
    setting, = sweep.make_grid([1.0], ["constant"], ["background"], flyp=False)
    # a run as OpenCLIP leaves it before its first checkpoint: params.txt (without a flag newer than it) only
    expected = expected_params(ctx.run_argv(setting))
    run_dir = out / "runs" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in expected.items() if k != "starft_templates"))
    record_run(ctx.out, RUN, {"content": content_of(expected, ctx.fingerprints)})
    assert sweep.plan_runs(ctx, [setting]) == {RUN: "resume"}  # same settings: it is continued
    for extra, named in ((["--starft-templates", "openai"], "starft_templates not recorded (now openai)"),
                         (["--epochs", "2"], "epochs 1 (now 2)")):
        other = sweep.context_of(sweep.build_parser().parse_args(argv(ws, out) + extra), None)
        with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
            sweep.plan_runs(other, [setting])
    # a score cached by an older sweep (no key) is not read back
    (out / "evals.json").write_text(json.dumps({"zero-shot@None": {"checkpoint": None, "metrics": {"val_avg": 1.0}}}))
    cache = sweep.ScoreCache(str(out / "evals.json"))
    sets = {"val": {"root": ws["val"], "format": "wds"}}
    with pytest.raises(ConfigError, match=r"cached score of zero-shot was computed otherwise: no key"):
        sweep.check_cached_scores(ctx, cache, sets, {"zero-shot": None}, [])
    assert cache.get("zero-shot@None", sweep.score_key(ctx, sets, None, None, sweep.ROLES)) is None
