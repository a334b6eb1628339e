"""Waterbirds-lite: the builder's data and refusals, and a miniature of the whole benchmark."""
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from open_clip_starft.errors import StarftError
from open_clip_starft.bench.waterbirds_lite import build, report
from open_clip_starft.bench.waterbirds_lite.cli import main as wbl_main


def test_labels_cover_both_places_and_both_bird_kinds():
    stamps, scenes = build.load_labels()
    kinds = {k: sum(s.kind == k for s in stamps) for k in ("waterbird", "landbird", "object")}
    places = {p: sum(s.place == p for s in scenes) for p in build.PLACES}
    assert kinds["waterbird"] >= 10 and kinds["landbird"] >= 10 and kinds["object"] >= 100, kinds
    assert places["water"] >= 5 and places["land"] >= 5, places  # ≥ 1 photograph per split and place
    assert len({s.name for s in stamps}) == len(stamps)  # names are class names: unique


def test_builder_refuses_missing_packages_and_empty_splits():
    with pytest.raises(StarftError, match=r"no-such-package-wbl.*apt-get install -y no-such-package-wbl"):
        build.ensure_packages(("no-such-package-wbl",), install=False)
    stamps, scenes = build.load_labels()
    few = [s for s in stamps if s.kind != "waterbird"] + [s for s in stamps if s.kind == "waterbird"][:2]
    with pytest.raises(StarftError, match=r"split of the waterbirds would be empty \(2 in all\)"):
        build.make_split(few, scenes, "identity", 0, 0.6)
    build.make_split(few, scenes, "shared", 0, 0.6)  # shared identities need one bird of each kind only
    with pytest.raises(StarftError, match="unknown split variant"):
        build.make_split(stamps, scenes, "by-colour", 0, 0.6)


def test_composition_is_deterministic_and_puts_the_cut_out_on_the_scene():
    stamps, scenes = build.load_labels()
    material = build.Material(stamps[:3], scenes[:2], image_size=48)
    a = material.compose(0, 1, np.random.default_rng([0, 1, 2]))
    b = material.compose(0, 1, np.random.default_rng([0, 1, 2]))
    assert a.size == (48, 48) and np.array_equal(np.asarray(a), np.asarray(b))
    # the same crop with and without the cut-out differ where the stamp's mask is
    rng = np.random.default_rng([0, 1, 2])
    bg = material.scene_images[1]
    side = int(rng.uniform(0.5, 1.0) * min(bg.size))
    x, y = int(rng.integers(0, bg.width - side + 1)), int(rng.integers(0, bg.height - side + 1))
    plain = np.asarray(bg.crop((x, y, x + side, y + side)).resize((48, 48), Image.BILINEAR)).astype(int)
    changed = (np.abs(np.asarray(a).astype(int) - plain).sum(-1) > 30).mean()
    assert 0.05 < changed < 0.9  # a visible object, not the whole image


def test_miniature_benchmark_end_to_end(tmp_path):
    out, docs = tmp_path / "wbl", tmp_path / "docs"
    argv = ["all", "--out", str(out), "--docs", str(docs), "--scale", "mini", "--splits", "identity:0",
            "--train-seeds", "0", "--methods", "flyp,starft", "--parallel", "2"]
    assert wbl_main(argv) == 0

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    split = manifest["splits"]["identity-s0"]
    # identity split: no bird and no scene photograph in two parts
    for kind, parts in split["birds"].items():
        assert not set(parts["train"]) & set(parts["test"]), kind
    for place, parts in split["scenes"].items():
        assert not set(parts["train"]) & set(parts["test"]) and not set(parts["val"]) & set(parts["test"]), place
    # wb-train is biased, wb-test balanced over the four groups (group = 2·label + place)
    train_groups, test_groups = split["sets"]["wb-train"]["groups"], split["sets"]["wb-test"]["groups"]
    aligned = (train_groups.get("0", 0) + train_groups.get("3", 0)) / sum(train_groups.values())
    assert aligned > 0.8 and len(test_groups) == 4 and min(test_groups.values()) >= 8
    sample = next(iter(wds.WebDataset(split["sets"]["wb-test"]["pattern"], shardshuffle=False)))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
    assert int(sample["group"]) // 2 == int(sample["cls"])

    records = json.loads((docs / "waterbirds-lite.json").read_text())
    methods = {(r["protocol"], r["method"]) for r in records}
    assert methods == {(p, m) for p in ("P1", "P2") for m in ("zero-shot", "flyp", "starft", "wise-flyp", "wise-starft")}
    for r in records:
        assert set(r) >= {"protocol", "method", "split", "seed", "avg", "worst_group", "groups"}
        assert 0 <= r["worst_group"] <= r["avg"] <= 1 and len(r["groups"]) == 4
        assert r["worst_group"] == min(r["groups"].values())
    # at step 0 of every fine-tune the Star term is ~0: the student starts as the teacher
    starft = [r for r in records if r["method"] == "starft"]
    assert len(starft) == 2 and all(r["star_loss_step0"] < 1e-6 for r in starft)
    text = (docs / "waterbirds-lite.md").read_text()
    assert "## Every run" in text and "starft − flyp" in text and (docs / "waterbirds-lite.png").stat().st_size > 1000
    # a second call reuses the finished stages (nothing is retrained)
    assert wbl_main(["run", *argv[1:]]) == 0


def test_report_statistics_by_hand():
    m, h = report.mean_ci([0.1, 0.3])
    assert m == pytest.approx(0.2) and h == pytest.approx(12.706 * (0.02 ** 0.5) / (2 ** 0.5))
    recs = [{"protocol": "P2", "method": meth, "split": "s", "seed": seed, "worst_group": wg, "avg": 0.5, "heldout": 0.1}
            for meth, seed, wg in (("starft", 0, 0.4), ("flyp", 0, 0.3), ("starft", 1, 0.2), ("flyp", 1, 0.25))]
    assert report.paired(recs, "P2", "starft", "flyp", "worst_group") == pytest.approx([0.1, -0.05])
