import json

import pytest

from open_clip_starft.demo import run as demo_run
from studies import demo_study as study


def test_competence_threshold_names_what_failed():
    assert demo_run.competence({"val_avg": 0.93, "val_worst_group": 0.83}, 0) is None
    # the seed 2: zero-shot .602 / .396
    text = demo_run.competence({"val_avg": 0.602, "val_worst_group": 0.396}, 2)
    assert text.startswith("pre-training failed for --seed 2")
    assert "validation avg 0.602 < 0.80" in text and "validation worst-group 0.396 < 0.50" in text
    assert "\n" not in text
    assert "avg" not in demo_run.competence({"val_avg": 0.9, "val_worst_group": 0.2}, 1)


def test_demo_stops_in_one_line_when_pretraining_fails(tmp_path, monkeypatch, capsys):
    # a 1-epoch pre-training on 64 images cannot learn the shapes: the demo must say so and stop
    monkeypatch.setattr(demo_run, "PRETRAIN_SAMPLES", 64)
    monkeypatch.setattr(demo_run, "PRETRAIN", dict(epochs=1, lr=1e-4, batch_size=32, warmup=1))
    monkeypatch.setattr(demo_run, "FINETUNE_SAMPLES", 64)
    monkeypatch.setattr(demo_run, "EVAL_SAMPLES", 64)
    assert demo_run.main(["--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("open-clip-starft demo: pre-training failed for --seed 0")
    assert not (tmp_path / "demo" / "sweep").exists()  # nothing was fine-tuned


def test_write_data_splits_are_disjoint_and_drawn_as_described(tmp_path, monkeypatch):
    import tarfile
    monkeypatch.setattr(demo_run, "PRETRAIN_SAMPLES", 16)
    monkeypatch.setattr(demo_run, "FINETUNE_SAMPLES", 16)
    monkeypatch.setattr(demo_run, "EVAL_SAMPLES", 64)
    data = demo_run.write_data(str(tmp_path), seed=0)

    def images(split):
        with tarfile.open(data[split]) as tar:  # 64 samples: one shard
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    val, test = images("val"), images("test")
    assert len(val) == len(test) == 64
    assert not set(val.values()) & set(test.values())  # validation and test share no image
    from PIL import Image
    import io
    sizes = {Image.open(io.BytesIO(b)).size for b in images("test_in_dist").values()}
    assert sizes == {(demo_run.IN_DIST_IMAGE_SIZE,) * 2}
    assert open(data["descriptors"]).read().count("{}") == 4


def test_units_never_share_an_image_in_any_part(tmp_path, monkeypatch):
    """Part seeds come from (unit, part): no sample (pixels, or the (seed, index) it is drawn from) is shared
    between two parts of one unit or between units; unit seed + offset made unit 1's test unit 0's val."""
    import hashlib
    import tarfile
    monkeypatch.setattr(demo_run, "PRETRAIN_SAMPLES", 32)
    monkeypatch.setattr(demo_run, "FINETUNE_SAMPLES", 32)
    monkeypatch.setattr(demo_run, "EVAL_SAMPLES", 32)
    seen, seeds = {}, {}
    for unit in (0, 1, 3):
        data = demo_run.write_data(str(tmp_path / f"u{unit}"), seed=unit)
        for part in demo_run.PART_IDS:
            seeds[(unit, part)] = demo_run.part_seed(unit, part)
            with tarfile.open(data[part]) as tar:  # 32 samples: one shard
                jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
            assert len(jpgs) == 32, (unit, part)
            for key, jpg in enumerate(jpgs):
                # pixels: the in-distribution parts are 12 px, the others 32 px; both decoded and hashed
                from PIL import Image
                import io
                digest = hashlib.sha1(Image.open(io.BytesIO(jpg)).tobytes()).hexdigest()
                assert digest not in seen, f"{(unit, part, key)} repeats {seen[digest]}"
                seen[digest] = (unit, part, key)
    assert len(set(seeds.values())) == len(seeds)  # no (unit, part) draws from another's sample seed
    assert demo_run.part_seed(1, "test") != demo_run.part_seed(0, "val")  # the old scheme's collision
    with pytest.raises(Exception, match="seed -1 is negative"):
        demo_run.part_seed(-1, "val")


def _records():
    """Two competent units and one failed one, numbers chosen by hand."""
    def rec(unit, method, lam=None, schedule=None, alpha=None, wg=0.0, idist=0.0, vwg=0.0, vid=0.0, selected=False, **kw):
        return {"protocol": "demo", "unit": unit, "method": method, "lam": lam, "schedule": schedule,
                "descriptors": None if lam in (None, 0) else "backgrounds", "alpha": alpha, "avg": 0.5,
                "worst_group": wg, "in_dist": idist, "val_avg": 0.9, "val_worst_group": vwg, "val_in_dist": vid,
                "heldout": None, "selected": selected, **kw}
    out = []
    for u, shift in (("u0", 0.0), ("u1", 0.1)):
        out += [rec(u, "zero-shot", wg=0.8, idist=0.6, vwg=0.8, competent=True),
                rec(u, "flyp", lam=0, wg=0.2, idist=0.9, vwg=0.3),
                # λ 1: val WG 0.5 (selected in u0), λ 2: val WG 0.4 + shift (selected in u1 only)
                rec(u, "starft", lam=1, schedule="constant", wg=0.4, idist=0.85, vwg=0.5, vid=0.8, selected=(u == "u0")),
                rec(u, "starft", lam=2, schedule="constant", wg=0.6, idist=0.85, vwg=0.4 + 2 * shift, vid=0.8,
                    selected=(u == "u1"))]
        # WiSE-FT(FLYP): (0.6, 0.8) → (0.8, 0.6) → (0.9, 0.2); at in-dist 0.85 its worst group is 0.40
        for a, x, y in ((0.0, 0.6, 0.8), (0.5, 0.8, 0.6), (1.0, 0.9, 0.2)):
            out.append(rec(u, "wise-flyp", lam=0, alpha=a, wg=y, idist=x))
    out.append(rec("u2", "zero-shot", wg=0.1, idist=0.3, vwg=0.1, competent=False))
    return out


def test_summarise_hand_computed():
    s = study.summarise(_records())
    assert s["units"] == ["u0", "u1"] and s["failed_units"] == ["u2"]
    # per-unit choice: u0 → λ 1 (test WG 0.4), u1 → λ 2 (test WG 0.6); FLYP 0.2; WiSE-FT at 0.85: 0.4
    sel = s["selected"]
    assert sel["minus_flyp_worst_group"]["per_unit"] == pytest.approx({"u0": 0.2, "u1": 0.4})
    assert sel["minus_wise_matched_worst_group"]["per_unit"] == pytest.approx({"u0": 0.0, "u1": 0.2})
    assert sel["minus_flyp_in_dist"]["mean"] == pytest.approx(-0.05)
    # pooled choice: mean val WG λ 1 = 0.5, λ 2 = (0.4 + 0.6) / 2 = 0.5, val in-dist 0.8 both: the first setting
    assert s["pooled_choice"] == {"lam": 1, "schedule": "constant", "descriptors": "backgrounds"}
    assert s["pooled"]["minus_flyp_worst_group"]["mean"] == pytest.approx(0.2)
    assert s["flyp_minus_zero_shot_worst_group"]["mean"] == pytest.approx(-0.6)
    # StarFT (selected) − zero-shot: u0 0.4 − 0.8, u1 0.6 − 0.8
    assert s["starft_minus_zero_shot_worst_group"]["per_unit"] == pytest.approx({"u0": -0.4, "u1": -0.2})
    text = study.markdown(_records(), s, {"seeds": "0,1,2", "lambdas": "1,2", "schedules": "constant", "note": "test"})
    assert "u2: zero-shot validation accuracy 90.0 %, worst group 10.0 %" in text
    assert "| StarFT − FLYP, test worst group | +30.0 ± " in text
    assert "StarFT (selected) − zero-shot, test worst group (what is left of the damage): -30.0 ± " in text
    json.dumps(s)  # the summary is plain JSON


def test_the_demo_default_is_the_setting_the_shipped_study_chose():
    """``demo_run.DEFAULT`` is the pooled validation choice of the records in docs/demo.json, and those records
    come from independent units (one data seed each, no unit twice)."""
    import os
    records = json.load(open(os.path.join(os.path.dirname(__file__), "..", "docs", "demo.json")))
    s = study.summarise(records)
    assert (s["pooled_choice"]["lam"], s["pooled_choice"]["schedule"]) == (demo_run.DEFAULT["lam"],
                                                                          demo_run.DEFAULT["schedule"])
    zero_shot = [r for r in records if r["method"] == "zero-shot"]
    assert len({r["unit"] for r in zero_shot}) == len(zero_shot) and len(s["units"]) >= 5


@pytest.mark.slow
def test_the_full_demo_as_readme_runs_it(tmp_path):
    """README's first command, end to end (about 5 minutes on 2 cores): exit 0, a competent zero-shot
    model, FLYP and the chosen StarFT setting evaluated, and the premise of the demo visible in its
    numbers: fine-tuning on the biased set costs test worst-group accuracy."""
    import subprocess
    import sys
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "open_clip_starft.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "sweep" / "sweep.json") as f:
        sweep = json.load(f)
    rows = {row["method"]: row for row in sweep["grid"]}
    assert set(rows) == {"zero-shot", "flyp", "starft"}
    assert rows["zero-shot"]["val_avg"] >= 0.80 and rows["zero-shot"]["val_worst_group"] >= 0.50
    assert sweep["selected"] == rows["starft"]["name"]
    assert rows["flyp"]["worst_group"] < rows["zero-shot"]["worst_group"]
    assert rows["flyp"]["in_dist"] > rows["zero-shot"]["in_dist"]
