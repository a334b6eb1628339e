import json
import math
import os
import shutil

import pytest

from open_clip_starft.demo import run as demo_run
from studies import demo_study as study

# a miniature of the demo's sizes: seconds per stage on a CPU
MINI_SIZES = dict(PRETRAIN_SAMPLES=128, FINETUNE_SAMPLES=64, EVAL_SAMPLES=64)
MINI_PRETRAIN = dict(epochs=1, lr=1e-3, batch_size=64, warmup=1)
MINI_FINETUNE = dict(epochs=2, lr=1e-4, batch_size=32, warmup=1)
# the design demo.run holds, as imported (the module's miniature fixture patches these for its tests)
HELD = dict(PRETRAIN_SAMPLES=demo_run.PRETRAIN_SAMPLES, PRETRAIN=dict(demo_run.PRETRAIN), DESIGN=dict(demo_run.DESIGN),
            FINETUNE=dict(demo_run.FINETUNE))


def miniature(monkeypatch):
    for name, value in MINI_SIZES.items():
        monkeypatch.setattr(demo_run, name, value)
    monkeypatch.setattr(demo_run, "PRETRAIN", MINI_PRETRAIN)
    monkeypatch.setattr(demo_run, "FINETUNE", MINI_FINETUNE)
    monkeypatch.setattr(demo_run, "COMPETENT", dict(val_avg=0.0, val_worst_group=0.0))  # a 1-epoch model passes


def test_competence_threshold_names_what_failed():
    assert demo_run.competence({"val_avg": 0.93, "val_worst_group": 0.83}, 0) is None
    text = demo_run.competence({"val_avg": 0.602, "val_worst_group": 0.396}, 2)
    assert text.startswith("pre-training failed for --seed 2")
    assert "target validation avg 0.602 < 0.80" in text and "target validation worst-group 0.396 < 0.50" in text
    assert "\n" not in text
    assert "avg" not in demo_run.competence({"val_avg": 0.9, "val_worst_group": 0.2}, 1)


def test_training_log_terms_reads_the_first_and_last_logged_step(tmp_path):
    lines = [  # as host/loop.log_train_progress writes them (a StarFT run, then no Star term: FLYP)
        "2026-12-06,18:53:19 | INFO | Train Epoch: 0 [  64/1024 (6%)] Data (t): 0.1 Batch (t): 0.5, 128/s, 128/s/gpu "
        "LR: 0.000050 Logit Scale: 27.543 Star lambda: 8 Star term: 0 Contrastive_loss: 2.1 (2.1) Star_loss: 0 (0)",
        "2026-12-06,18:53:20 | INFO | StarFT data, epoch 0: 1024 samples",
        "2026-12-06,18:53:21 | INFO | Train Epoch: 1 [1024/1024 (100%)] Data (t): 0.1 Batch (t): 0.5, 128/s, 128/s/gpu "
        "LR: 0.000001 Logit Scale: 28.001 Star lambda: 8 Star term: 0.0123456 Contrastive_loss: 1.0 (1.1)"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "out.log").write_text("\n".join(lines) + "\n")
    assert demo_run.training_log_terms(str(run)) == {"teacher_logit_scale": 27.543, "star_term_first": 0.0,
                                                     "star_term_last": 0.0123456}
    (run / "out.log").write_text("\n".join(line.replace("Star lambda: 8 ", "").split(" Star term")[0] + " Loss: 1"
                                           for line in lines) + "\n")
    assert demo_run.training_log_terms(str(run)) == {"teacher_logit_scale": 27.543, "star_term_first": None,
                                                     "star_term_last": None}
    (run / "out.log").write_text("no step\n")
    with pytest.raises(Exception, match="logged no step"):
        demo_run.training_log_terms(str(run))


def _records():
    """Two competent units and one failed one, numbers chosen by hand (epochs 1 and 2; 2 is the last)."""
    def rec(unit, method, lam=None, schedule=None, descriptors=None, epoch=2, alpha=None, wg=0.0, avg=0.5, idist=0.0,
            vwg=0.0, vid=0.0, selected=False, **kw):
        return {"protocol": "demo-transfer", "unit": unit, "pretrain_seed": int(unit[-1]), "method": method,
                "lam": lam, "schedule": schedule, "descriptors": descriptors, "epoch": epoch, "alpha": alpha,
                "avg": avg, "worst_group": wg, "in_dist": idist, "val_avg": 0.9, "val_worst_group": vwg,
                "val_in_dist": vid, "selected": selected, "teacher_logit_scale": 20.0, "star_term_first": 0.0,
                "star_term_last": 0.01, **kw}
    out = []
    for u, shift in (("pretrain-seed0", 0.0), ("pretrain-seed1", 0.1)):
        out += [rec(u, "zero-shot", epoch=None, wg=0.8, idist=0.3, vwg=0.8, vid=0.3, competent=True),
                # FLYP: epoch 1 is its best on source validation (0.85 > 0.80)
                rec(u, "flyp", lam=0.0, epoch=1, wg=0.3, idist=0.85, vid=0.85),
                rec(u, "flyp", lam=0.0, wg=0.2, idist=0.9, vid=0.80),
                # λ 0.5 linear: epoch 2 best on source validation
                rec(u, "starft", 0.5, "linear", "backgrounds", epoch=1, wg=0.9, idist=0.6, vid=0.6),
                rec(u, "starft", 0.5, "linear", "backgrounds", wg=0.4, idist=0.85, vwg=0.3, vid=0.85),
                rec(u, "starft", 0.5, "linear", "background", epoch=1, wg=0.1, idist=0.7, vid=0.7),
                rec(u, "starft", 0.5, "linear", "background", wg=0.5, idist=0.85, vid=0.7),
                # λ 8 constant: chosen on target validation in u0 (0.5 > 0.3), in u1 too (0.5 + 0.2 > 0.3)
                rec(u, "starft", 8.0, "constant", "backgrounds", wg=0.6 + shift, idist=0.85, vwg=0.5 + 2 * shift,
                    vid=0.8, selected=True)]
        # WiSE-FT(FLYP): (0.3, 0.8) → (0.8, 0.6) → (0.9, 0.2); at source 0.85 linear: 0.40, nearest: 0.6 (α 0.5)
        for a, x, y in ((0.0, 0.3, 0.8), (0.5, 0.8, 0.6), (1.0, 0.9, 0.2)):
            out.append(rec(u, "wise-flyp", 0.0, alpha=a, wg=y, idist=x))
    out.append(rec("pretrain-seed2", "zero-shot", epoch=None, wg=0.1, vwg=0.1, vid=0.3, val_avg=0.2, competent=False))
    return out


def test_summarise_hand_computed():
    s = study.summarise(_records())
    assert s["units"] == ["pretrain-seed0", "pretrain-seed1"] and s["failed_units"] == ["pretrain-seed2"]
    assert s["premise_flyp_minus_zero_shot"]["worst_group"]["mean"] == pytest.approx(-0.6)
    # (a): StarFT λ 0.5 linear at its epoch 2 (0.4) − FLYP at its epoch 1 (0.3); source 0.85 − 0.85
    a = s["a_paper"]
    assert a["minus_flyp"]["worst_group"]["mean"] == pytest.approx(0.1)
    assert a["minus_flyp"]["in_dist"]["mean"] == pytest.approx(0.0)
    assert a["epochs"] == {"pretrain-seed0": [2, 1], "pretrain-seed1": [2, 1]}
    assert a["minus_wise"]["linear"]["mean"] == pytest.approx(0.0)  # 0.4 − 0.4
    assert a["minus_wise"]["nearest"]["mean"] == pytest.approx(-0.2)  # 0.4 − 0.6 (α 0.5 at 0.8 is nearest to 0.85)
    assert a["minus_wise"]["dominated_units"] == 0  # (0.85, 0.4) vs (0.8, 0.6) and (0.9, 0.2): neither dominates
    # the packaged set's λ 0.5 linear: epoch 2 (source val 0.7 = epoch 1's; ties go to the later epoch)
    assert s["a_paper_background_set"]["minus_flyp"]["worst_group"]["mean"] == pytest.approx(0.2)
    # (b): λ 8 constant in both units: 0.6 − 0.2 and 0.7 − 0.2
    assert s["b_chosen"]["minus_flyp"]["worst_group"]["per_unit"] == pytest.approx(
        {"pretrain-seed0": 0.4, "pretrain-seed1": 0.5})
    assert s["b_chosen"]["choices"]["pretrain-seed0"] == [8.0, "constant"]
    # (c): 0.6 − 0.4 and 0.7 − 0.4 (linear); 0.6 − 0.6 and 0.7 − 0.6 (nearest)
    c = s["c_chosen_minus_wise"]
    assert c["linear"]["per_unit"] == pytest.approx({"pretrain-seed0": 0.2, "pretrain-seed1": 0.3})
    assert c["nearest"]["per_unit"] == pytest.approx({"pretrain-seed0": 0.0, "pretrain-seed1": 0.1})
    assert (c["nearest"]["wins"], c["nearest"]["ties"]) == (1, 1)
    sd = math.sqrt(2 * 0.05 ** 2)  # per-unit 0.2 and 0.3: mean 0.25, sd 0.0707, t(0.975, 1) = 12.7062
    assert c["linear"]["ci95"] == pytest.approx(12.7062 * sd / math.sqrt(2), rel=1e-4)
    assert s["pooled_choice"] == {"lam": 8.0, "schedule": "constant"}
    text = study.markdown(_records(), s, {"command": "python -m studies.demo_study --seeds 0,1,2"})
    assert "pretrain-seed2: target validation accuracy 20.0 %, worst group 10.0 %" in text
    assert "| premise: FLYP − zero-shot | -60.0 ± 0.0 (2 units; W/T/L 0/0/2) |" in text
    assert "| (c) (b) − WiSE-FT(FLYP) at its source acc, linear | +25.0 ± " in text
    assert "**Reading.** FLYP − zero-shot target worst group (the premise) is below zero (-60.0 ± 0.0)" in text
    assert "(c) that StarFT − WiSE-FT(FLYP) at matched source accuracy (linear) is not distinguishable from zero (+25.0 ± 63.5)" in text
    json.dumps(s)  # the summary is plain JSON


def test_the_demo_default_is_the_setting_the_shipped_study_chose():
    """``demo_run.DEFAULT`` is the pooled validation choice of the records in docs/demo.json, from independent
    units (one data seed each, no unit twice), each record with the teacher's scale and the Star terms."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "demo.json")
    records = json.load(open(path))
    s = study.summarise(records)
    assert s["pooled_choice"] == {"lam": demo_run.DEFAULT["lam"], "schedule": demo_run.DEFAULT["schedule"]}
    zero_shot = [r for r in records if r["method"] == "zero-shot"]
    assert len({r["unit"] for r in zero_shot}) == len(zero_shot) == len({r["pretrain_seed"] for r in zero_shot})
    assert all(set(study.RECORD_FIELDS) <= set(r) and r["teacher_logit_scale"] > 0 for r in records)
    assert all(r["star_term_last"] is not None for r in records if r["method"] == "starft")


@pytest.mark.e2e  # trains in real processes (the stage runner)
def test_demo_stops_in_one_line_when_pretraining_fails(tmp_path, monkeypatch, capsys):
    # a 1-epoch pre-training on 64 images cannot learn the shapes: the demo must say so and stop
    for name, value in MINI_SIZES.items():
        monkeypatch.setattr(demo_run, name, value)
    monkeypatch.setattr(demo_run, "PRETRAIN_SAMPLES", 64)
    monkeypatch.setattr(demo_run, "PRETRAIN", dict(epochs=1, lr=1e-4, batch_size=32, warmup=1))
    assert demo_run.main(["--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("open-clip-starft demo: pre-training failed for --seed 0")
    assert not (tmp_path / "demo" / "runs").exists()  # nothing was fine-tuned


@pytest.fixture(scope="module")
def mini_demo(tmp_path_factory):
    """The demo's run in miniature (its printed output and folder)."""
    monkeypatch = pytest.MonkeyPatch()
    miniature(monkeypatch)
    out = tmp_path_factory.mktemp("mini") / "demo"
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = demo_run.main(["--out", str(out)])
    yield status, printed.getvalue(), out, monkeypatch
    monkeypatch.undo()


@pytest.mark.e2e  # trains in real processes (the stage runner)
def test_the_demos_printed_table(mini_demo):
    status, text, out, _ = mini_demo
    assert status == 0, text
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and all(_is_number(p) for p in parts[-3:]):
            rows[" ".join(parts[:-3])] = [float(p) for p in parts[-3:]]
        elif len(parts) >= 3 and line.strip().startswith("WiSE-FT(FLYP) at its source acc"):
            rows.setdefault("wise", []).append([float(p) for p in parts[-2:]])
    names = [n for n in rows if n != "wise"]
    assert names == ["zero-shot", "FLYP", f"StarFT λ 0.5 linear (paper)",
                     f"StarFT λ {demo_run.DEFAULT['lam']:g} {demo_run.DEFAULT['schedule']} (study)"]
    assert all(0 <= v <= 100 for n in names for v in rows[n])
    # one WiSE-FT(FLYP) row per StarFT row, printed at that row's source accuracy
    assert [w[1] for w in rows["wise"]] == [rows[n][2] for n in names[2:]]
    assert "In this one run, fine-tuning on the source task moved target worst group from " in text
    assert f"from {rows['zero-shot'][0]:.1f} to {rows['FLYP'][0]:.1f} % (FLYP)" in text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.e2e  # trains in real processes (the stage runner)
def test_the_study_pipeline_in_miniature(mini_demo, tmp_path):
    """One unit of the study at miniature sizes (λ 0.5 × linear/constant): its records, the teacher's scale
    and Star terms read from the logs, the epoch records, WiSE-FT's ends, the report, and resuming."""
    _, _, demo_out, _ = mini_demo  # its zero-shot model is reused (the same seed's data and pre-training)
    root = tmp_path / "study"
    shutil.copytree(demo_out / "models", root / "seed0" / "models")
    docs = tmp_path / "docs"
    assert study.main(["--out", str(root), "--seeds", "0", "--lambdas", "0.5", "--docs", str(docs)]) == 0
    records = json.load(open(docs / "demo.json"))
    assert all(set(study.RECORD_FIELDS) <= set(r) for r in records)
    from open_clip_starft.eval.models import create_model
    model = create_model(f"local-dir:{root / 'seed0' / 'models' / 'zero-shot'}", "cpu", None)[0]
    scale = float(model.logit_scale.exp())
    assert all(r["teacher_logit_scale"] == pytest.approx(scale, abs=2e-3) for r in records)  # logged with 3 decimals
    starft = [r for r in records if r["method"] == "starft" and r["epoch"] == 2]
    assert {(r["lam"], r["schedule"], r["descriptors"]) for r in starft} == {
        (0.5, "linear", "backgrounds"), (0.5, "constant", "backgrounds"), (0.5, "linear", "background")}
    assert all(r["star_term_first"] == pytest.approx(0, abs=1e-6) for r in starft)  # the student is the teacher
    assert all(r["star_term_last"] > 0 for r in starft)
    assert sum(r["selected"] for r in records) == 1
    # epoch 1 records for FLYP and the two paper-default runs only
    assert sorted((r["method"], r["descriptors"]) for r in records if r["epoch"] == 1) == [
        ("flyp", None), ("starft", "background"), ("starft", "backgrounds")]
    for label, end in (("wise-flyp", [r for r in records if r["method"] == "flyp" and r["epoch"] == 2][0]),
                       ("wise-starft", [r for r in starft if r["selected"]][0])):
        curve = sorted((r for r in records if r["method"] == label), key=lambda r: r["alpha"])
        assert [round(r["alpha"], 2) for r in curve] == [round(0.05 * i, 2) for i in range(21)]
        zs = [r for r in records if r["method"] == "zero-shot"][0]
        assert (curve[0]["worst_group"], curve[0]["in_dist"]) == pytest.approx((zs["worst_group"], zs["in_dist"]))
        assert (curve[-1]["worst_group"], curve[-1]["in_dist"]) == pytest.approx((end["worst_group"], end["in_dist"]))
    text = (docs / "demo.md").read_text()
    assert "## Evidence (1 units finished: pretrain-seed0)" in text and (docs / "demo.png").exists()
    assert not (root / "seed0" / "runs").exists()  # checkpoints removed once the unit's records are written
    # resuming: a finished unit is skipped, its records kept; --report rewrites the page from demo.json alone
    (docs / "demo.md").unlink()
    assert study.main(["--out", str(root), "--seeds", "0", "--lambdas", "0.5", "--docs", str(docs)]) == 0
    assert json.load(open(docs / "demo.json")) == records
    (docs / "demo.md").unlink()
    assert study.main(["--report", "--seeds", "0", "--lambdas", "0.5", "--docs", str(docs)]) == 0
    assert (docs / "demo.md").read_text() == text


def test_the_study_runs_only_the_design_chosen_on_validation(tmp_path, monkeypatch):
    from open_clip_starft.data.files import write_json
    for name, value in HELD.items():  # the design as shipped, whatever a miniature patched before this test
        monkeypatch.setattr(demo_run, name, value)
    write_json(str(tmp_path / "demo-design.json"), {"chosen": "p8192-e30-ft16-lr2e-3", "candidates": []})
    with pytest.raises(Exception, match="chose 'p8192-e30-ft16-lr2e-3' but demo.run holds p8192-e40-w256-lr2e-3"):
        study.check_design(str(tmp_path))  # the same fine-tune, another pre-training: not the design chosen
    write_json(str(tmp_path / "demo-design.json"), {"chosen": "p8192-e40-w256-lr2e-3", "candidates": []})
    study.check_design(str(tmp_path))
    study.check_design(os.path.join(os.path.dirname(__file__), "..", "docs"))  # the committed record: demo.run's
    study.check_design(str(tmp_path / "none"))  # no record (a miniature's docs): nothing to check


def test_readmes_evidence_table_is_the_shipped_study_recomputed(readme_row):
    """README's demo table quotes ``summarise(docs/demo.json)`` (recomputed here, not read from demo.md): a unit
    added to the records without README's table following, or a number typed by hand, fails."""
    root = os.path.join(os.path.dirname(__file__), "..")
    s = study.summarise(json.load(open(os.path.join(root, "docs", "demo.json"))))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    assert f"**The transfer demo's study: {len(s['units'])} units**" in readme
    for row, d in [("premise: FLYP − zero-shot", s["premise_flyp_minus_zero_shot"]["worst_group"]),
                   ("(a) the paper's λ 0.5 linear − FLYP", s["a_paper"]["minus_flyp"]["worst_group"]),
                   ("(a) the same with the packaged `background` set − FLYP",
                    s["a_paper_background_set"]["minus_flyp"]["worst_group"]),
                   (") − FLYP", s["b_chosen"]["minus_flyp"]["worst_group"]),
                   ("(c) that choice − WiSE-FT(FLYP) at its source accuracy, interpolated", s["c_chosen_minus_wise"]["linear"]),
                   ("(c) the same, nearest α", s["c_chosen_minus_wise"]["nearest"])]:
        assert f"{row} | {readme_row(d)}" in readme, row
