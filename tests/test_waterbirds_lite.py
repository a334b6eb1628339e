"""Waterbirds-lite: the builder's data and refusals, and a miniature of the whole benchmark."""
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from open_clip_starft.errors import DataError, StarftError
from studies.waterbirds_lite import build, report
from studies.waterbirds_lite.cli import main as wbl_main


def test_labels_cover_both_places_and_both_bird_kinds():
    stamps, scenes = build.load_labels()
    kinds = {k: sum(s.kind == k for s in stamps) for k in ("waterbird", "landbird", "object")}
    places = {p: sum(s.place == p for s in scenes) for p in build.PLACES}
    assert kinds["waterbird"] >= 10 and kinds["landbird"] >= 10 and kinds["object"] >= 100, kinds
    assert places["water"] >= 5 and places["land"] >= 5, places  # ≥ 1 photograph per split and place
    assert len({s.name for s in stamps}) == len(stamps)  # names are class names: unique


def test_missing_packages_are_named_in_one_line_and_never_installed_unasked(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(build, "missing_packages", lambda packages=build.PACKAGES: ["mate-backgrounds", "tuxpaint-data"])
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: calls.append(a))  # would be apt-get
    with pytest.raises(DataError) as e:
        build.ensure_packages()
    assert str(e.value) == ("Waterbirds-lite needs Debian packages that are not installed; install them as root: "
                            "apt-get install -y mate-backgrounds tuxpaint-data")
    with pytest.raises(DataError):
        build.build(str(tmp_path), [("shared", 0)])  # the library's default installs nothing
    # the command line: one line, exit 2, the flag that installs named; nothing was run
    assert wbl_main(["build", "--out", str(tmp_path / "o"), "--splits", "shared:0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("apt-get install -y mate-backgrounds tuxpaint-data "
                                             "(or rerun with --install-packages)"), err
    assert calls == []


def test_builder_refuses_empty_splits():
    stamps, scenes = build.load_labels()
    few = [s for s in stamps if s.kind != "waterbird"] + [s for s in stamps if s.kind == "waterbird"][:2]
    with pytest.raises(StarftError, match=r"split of the waterbird species would be empty \(2 in all\)"):
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


def test_identity_splits_group_stamps_by_species_and_shared_splits_keep_every_species():
    stamps, scenes = build.load_labels()
    species = {s.name: s.group for s in stamps}
    assert species["domestic duck"] == species["duck"] and species["white peafowl"] == species["peacock"]
    assert species["rooster"] == species["hen"] == species["chicken"]
    for seed in range(5):
        split = build.make_split(stamps, scenes, "identity", seed, 0.6)
        for kind, parts in split["birds"].items():
            sides = {part: {stamps[i].group for i in idx} for part, idx in parts.items()}
            assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"] \
                and not sides["val"] & sides["test"], (seed, kind, sides)
            # every bird on one side; pre-training shows the train part only (in transfer splits: every bird)
            assert sum(len(parts[p]) for p in ("train", "val", "test")) == sum(s.kind == kind for s in stamps)
            assert parts["pretrain"] == parts["train"]
        shared = build.make_split(stamps, scenes, "shared", seed, 0.6)
        for kind, parts in shared["birds"].items():
            assert parts["train"] == parts["val"] == parts["test"] == parts["pretrain"]
        for place in build.PLACES:  # scene photographs never shared between parts
            p = shared["scenes"][place]
            assert not set(p["train"]) & set(p["test"]) and not set(p["val"]) & set(p["test"])
        crops = build.make_split(stamps, scenes, "crops", seed, 0.6)  # every species and photograph in every part
        assert crops["birds"] == shared["birds"]
        for place in build.PLACES:
            every = [i for i, s in enumerate(scenes) if s.place == place]
            assert all(crops["scenes"][place][part] == every for part in ("train", "val", "test"))
        # P1's source task: the source objects and the train-part bird species, a species one class
        classes = build.source_classes(stamps, split)
        birds = [c for c in classes if c[2] != "object"]
        assert {c[0] for c in birds} == {stamps[i].group for k in split["birds"] for i in split["birds"][k]["train"]}
        assert len(classes) == len(split["source_classes"]) + len(birds)
    duck = next(s for s in stamps if s.name == "duck")
    assert build.pretrain_captions(duck, ["on a lake"]) == ["duck", "waterbird, a duck", "waterbird", "duck on a lake",
                                                            "waterbird, a duck on a lake", "waterbird on a lake"]


def _shard_samples(pattern: str) -> list[dict]:
    from open_clip_train.data import expand_urls
    return list(wds.WebDataset(expand_urls(pattern)[0], shardshuffle=False))


def test_transfer_split_keeps_every_target_species_cut_out_out_of_every_fine_tune_shard(tmp_path):
    """The transfer variant, built and read back from its written shards: bird species split about half and half
    per kind into source and target; every fine-tuning set shows source species only (no target cut-out), validation
    and test target species only, balanced; pre-training every species, birds on balanced places."""
    sizes = build.Sizes(image_size=16, pretrain=400, wb_train=48, wb_val=48, wb_test=64, source_train=120,
                        source_val=48, source_test=48, heldout_test=16)
    manifest = build.build(str(tmp_path), [("transfer", 0)], sizes, log=lambda text: None)
    split = manifest["splits"]["transfer-s0"]
    stamps, scenes = build.load_labels()
    by_file = {s.file: s for s in stamps}
    for kind in ("waterbird", "landbird"):
        source, target = set(split["species"][kind]["train"]), set(split["species"][kind]["test"])
        every = {s.group for s in stamps if s.kind == kind}
        assert split["species"][kind]["val"] == split["species"][kind]["test"] and not source & target
        assert source | target == every and abs(len(source) - len(target)) <= 1, kind
        assert set(split["species"][kind]["pretrain"]) == every
    source = {sp for kind in ("waterbird", "landbird") for sp in split["species"][kind]["train"]}
    target = {sp for kind in ("waterbird", "landbird") for sp in split["species"][kind]["test"]}
    shown = {}
    for name, info in split["sets"].items():
        samples = _shard_samples(info["pattern"])
        assert len(samples) == info["samples"], name
        shown[name] = [by_file[s["stamp.txt"].decode()] for s in samples]
    for name in build.FINETUNE_SETS:
        birds = {s.group for s in shown[name] if s.kind != "object"}
        assert birds and birds <= source and not birds & target, (name, birds & target)
    for name in ("wb-val", "wb-test"):
        assert {s.group for s in shown[name]} <= target and {s.kind for s in shown[name]} == {"waterbird", "landbird"}
        groups = split["sets"][name]["groups"]  # balanced: each of the four groups near a quarter
        assert len(groups) == 4 and min(groups.values()) >= split["sets"][name]["samples"] // 8, (name, groups)
    pretrained = {s.group for s in shown["pretrain"] if s.kind != "object"}
    assert pretrained & target and pretrained & source
    # pre-training: a bird on its own place half of the time (balanced), an object 80 % (3-sigma binomial bounds)
    samples = _shard_samples(split["sets"]["pretrain"]["pattern"])
    for kinds, p in (({"waterbird", "landbird"}, 0.5), ({"object"}, sizes.p_pretrain_natural)):
        own = [build.PLACES[int(x["group"])] == by_file[x["stamp.txt"].decode()].place for x in samples
               if by_file[x["stamp.txt"].decode()].kind in kinds]
        assert abs(sum(own) / len(own) - p) < 3 * (p * (1 - p) / len(own)) ** 0.5, (kinds, sum(own) / len(own))
    # P1's source birds sit on their own place 95 % of the time (the shortcut the fine-tune can learn)
    birds = [(x, by_file[x["stamp.txt"].decode()]) for x in _shard_samples(split["sets"]["source-train"]["pattern"])]
    birds = [build.PLACES[int(x["group"])] == s.place for x, s in birds if s.kind != "object"]
    assert sum(birds) / len(birds) > 0.85


@pytest.mark.e2e
def test_miniature_benchmark_end_to_end(tmp_path):
    out, docs = tmp_path / "wbl", tmp_path / "docs"
    argv = ["all", "--out", str(out), "--docs", str(docs), "--scale", "mini", "--splits", "transfer:0",
            "--train-seeds", "0", "--lambdas", "2", "--schedules", "constant", "--parallel", "2",
            "--protocols", "P1,P2"]
    assert wbl_main(argv) == 0

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    split = manifest["splits"]["transfer-s0"]
    # transfer split (the default): source species (train) and target species (val = test) apart, no scene
    # photograph in two parts
    for kind, parts in split["species"].items():
        assert not set(parts["train"]) & set(parts["test"]) and parts["val"] == parts["test"], kind
    for place, parts in split["scenes"].items():
        assert not set(parts["train"]) & set(parts["test"]) and not set(parts["val"]) & set(parts["test"]), place
    # every photograph recorded with its package and its one part; val/test photographs are in no training set
    photos = split["photographs"]
    stamps, scenes = build.load_labels()
    assert len(photos) == len(scenes) and all(len(p["parts"]) == 1 for p in photos)
    assert {p["package"] for p in photos} <= set(build.PACKAGES)
    for place in build.PLACES:
        for part in ("train", "val", "test"):
            assert sorted(split["scenes"][place][part]) == sorted(
                p["file"] for p in photos if p["place"] == place and p["parts"] == [part])
    # pre-training named every bird, source and target (their names, some with the superclass)
    pre_names = set((out / "data" / "transfer-s0" / "pretrain" / "classnames.txt").read_text().splitlines())
    assert set(split["birds"]["waterbird"]["pretrain"] + split["birds"]["landbird"]["pretrain"]) <= pre_names
    assert {f"waterbird, a {split['birds']['waterbird'][part][0]}" for part in ("train", "test")} <= pre_names
    # wb-train is biased, wb-test balanced over the four groups (group = 2·label + place)
    train_groups, test_groups = split["sets"]["wb-train"]["groups"], split["sets"]["wb-test"]["groups"]
    aligned = (train_groups.get("0", 0) + train_groups.get("3", 0)) / sum(train_groups.values())
    assert aligned > 0.8 and len(test_groups) == 4 and min(test_groups.values()) >= 8
    sample = next(iter(wds.WebDataset(split["sets"]["wb-test"]["pattern"], shardshuffle=False)))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
    assert int(sample["group"]) // 2 == int(sample["cls"])
    # P1's fine-tune length was chosen on source-val among the mini schedule's (1, 2) epochs
    p1 = json.loads((out / "p1_epochs.json").read_text())["transfer-s0-p0"]["0"]
    assert set(p1["source_val"]) == {"1", "2"} and p1["chosen"] in (1, 2)
    # v3's LiT pre-training on cached outputs locked both towers: the whole trunk (weights and BatchNorm statistics)
    # is as mapped from the package, while both projections learnt
    from safetensors.torch import load_file
    from studies.waterbirds_lite import efficientnet
    init = load_file(str(out / "models" / "transfer-s0-p0" / "init" / "open_clip_model.safetensors"))
    zero_shot = load_file(str(out / "models" / "transfer-s0-p0" / "zero-shot" / "open_clip_model.safetensors"))
    import timm  # the trunk's keys in module order (a safetensors file sorts them)
    imagenet = efficientnet.timm_state_dict(timm.create_model(efficientnet.TIMM_NAME, num_classes=0).state_dict())
    assert len(imagenet) > 200 and all(torch.equal(zero_shot[f"visual.trunk.{k}"], imagenet[k]) for k in imagenet)
    check = json.loads((out / "zero_shot.json").read_text())["transfer-s0-p0"]
    assert check["pretrain_recipe"] == "lit-cached" and len(check["pretrain_loss"]) == 1
    assert not torch.equal(zero_shot["visual.head.proj.weight"], init["visual.head.proj.weight"])
    assert not torch.equal(zero_shot["text.proj.weight"], init["text.proj.weight"])

    records = json.loads((docs / "waterbirds-lite.json").read_text())
    methods = {(r["protocol"], r["method"]) for r in records}
    assert methods == {(p, m) for p in ("P1", "P2") for m in ("zero-shot", "flyp", "starft", "wise-flyp", "wise-starft")}
    fields = {"protocol", "method", "unit", "split", "pretrain_seed", "seed", "lam", "schedule", "descriptors", "alpha",
              "avg", "worst_group", "in_dist", "val_avg", "val_worst_group", "heldout", "selected"}
    for r in records:
        assert set(r) >= fields | {"groups", "fine_tune_seed", "machine", "wall_s"}, fields - set(r)
        assert r["fine_tune_seed"] == r["seed"] and "CPU cores" in r["machine"]
        assert 0 <= r["worst_group"] <= r["avg"] <= 1 and len(r["groups"]) == 4
        assert r["worst_group"] == min(r["groups"].values())
        assert r["unit"] == "transfer-s0-p0" and r["pretrain_seed"] == 0
    for protocol in ("P1", "P2"):
        starft = [r for r in records if r["protocol"] == protocol and r["method"] == "starft"]
        assert len(starft) == 1 and starft[0]["selected"] and (starft[0]["lam"], starft[0]["schedule"]) == (2, "constant")
        assert starft[0]["descriptors"] == "background" and starft[0]["alpha"] is None
        # the Star term at step 0 is 0: the student starts as the teacher. With v3's BatchNorm tower that needs the
        # student on the teacher's running statistics (--starft-freeze-bn-stats, the scale's)
        assert math.isfinite(starft[0]["star_loss_step0"]) and abs(starft[0]["star_loss_step0"]) < 1e-4
        for wise in ("wise-flyp", "wise-starft"):
            alphas = [r["alpha"] for r in records if r["protocol"] == protocol and r["method"] == wise]
            assert alphas == [0.5]  # the mini scale's WiSE-FT points (full: 0.1 … 0.9)
        # the two-class terms: exactly 0 for the teacher against itself, above 0 once fine-tuned
        zs = next(r for r in records if r["protocol"] == protocol and r["method"] == "zero-shot")
        flyp = next(r for r in records if r["protocol"] == protocol and r["method"] == "flyp")
        assert abs(zs["star_masked"]) < 1e-6 and abs(zs["star_unmasked"]) < 1e-6
        assert flyp["star_unmasked"] > 1e-6 and set(flyp["margin"]) == set(build.WB_GROUP_NAMES)
        assert set(flyp["margin_by_background"]) == set(build.PLACES)
    p1_flyp = next(r for r in records if r["protocol"] == "P1" and r["method"] == "flyp")
    assert p1_flyp["epochs"] == p1["chosen"]
    # the pre-training stage's validation check (which decides competence) holds the numbers the report evaluated
    # later from the same model; its average is its groups weighted by wb-val's group counts, its worst group their min
    p1_zero_shot = next(r for r in records if r["protocol"] == "P1" and r["method"] == "zero-shot")
    assert check["val_avg"] == pytest.approx(p1_zero_shot["val_avg"], abs=1e-9)
    assert check["val_worst_group"] == pytest.approx(p1_zero_shot["val_worst_group"], abs=1e-9)
    assert check["source_val"] == pytest.approx(p1_zero_shot["val_in_dist"], abs=1e-9)
    val_counts = split["sets"]["wb-val"]["groups"]
    assert check["val_avg"] == pytest.approx(sum(check["val_groups"][build.WB_GROUP_NAMES[int(g)]] * n for g, n in
                                                 val_counts.items()) / sum(val_counts.values()), abs=1e-9)
    assert check["val_worst_group"] == min(check["val_groups"].values()) and 0 < check["val_avg"] < 1
    # the gate reads validation only and reuses every finished stage: its zero-shot and FLYP numbers are the
    # records', its difference theirs, its verdict its sign
    assert wbl_main(["gate", *argv[1:]]) == 0
    gate = json.loads((docs / "gate.json").read_text())
    entry = gate["units"]["transfer-s0-p0"]
    run = entry["seeds"]["0"]
    assert run["chosen_epochs"] == p1["chosen"] and set(run["flyp"]) == {"1", "2"}
    flyp_val = run["flyp"][str(p1["chosen"])]
    assert entry["zero_shot"]["val_worst_group"] == pytest.approx(p1_zero_shot["val_worst_group"], abs=1e-9)
    assert flyp_val["val_worst_group"] == pytest.approx(p1_flyp["val_worst_group"], abs=1e-9)
    assert flyp_val["source_val"] == pytest.approx(p1_flyp["val_in_dist"], abs=1e-9)
    assert run["flyp_minus_zero_shot_val_worst_group"] == pytest.approx(
        p1_flyp["val_worst_group"] - p1_zero_shot["val_worst_group"], abs=1e-9)
    assert entry["damage"] == gate["passes"] == (run["flyp_minus_zero_shot_val_worst_group"] < 0)
    assert "VALIDATION only" in (docs / "gate.md").read_text()
    assert json.loads((docs / "zero_shot.json").read_text()) == json.loads((out / "zero_shot.json").read_text())
    # FLYP and StarFT alike kept the zero-shot BatchNorm statistics, trained in channels-last layout
    name = "P2-transfer-s0-p0-seed0-flyp-e1"  # the mini scale's one P2 epoch
    flyp_state = torch.load(str(out / "logs" / name / "checkpoints" / "epoch_1.pt"),
                            map_location="cpu", weights_only=True)["state_dict"]
    stats = [k for k in zero_shot if "running_" in k]
    assert len(stats) > 40 and all(torch.equal(flyp_state[k], zero_shot[k]) for k in stats)
    flyp_log = (out / "logs" / name / "out.log").read_text()
    assert "BatchNorm layers keep the zero-shot model's running statistics" in flyp_log
    assert "weights in channels-last memory layout" in flyp_log
    text = (docs / "waterbirds-lite.md").read_text()
    assert "## Every run" in text and "StarFT (selected) − FLYP: worst group" in text
    assert "StarFT (selected) − WiSE-FT(FLYP) at its in-dist" in text and (docs / "waterbirds-lite.png").stat().st_size > 1000
    zero_shot_record = next(r for r in records if r["method"] == "zero-shot")
    assert zero_shot_record["competent"] and set(zero_shot_record["stage_wall_s"]) == {"pretrain", "run", "evaluate"}
    assert "nearest evaluated α point" in text and "dominates" in text
    # a second call reuses the finished stages (nothing is retrained) and the unit's records (nothing re-evaluated)
    kept = out / "records" / "transfer-s0-p0.json"
    stamp = kept.stat().st_mtime_ns
    assert wbl_main(["run", *argv[1:]]) == 0
    assert wbl_main(["report", *argv[1:]]) == 0
    assert kept.stat().st_mtime_ns == stamp
    def without_times(rs):  # stage_wall_s sums every call's wall time, this one's too
        return [{k: v for k, v in r.items() if k != "stage_wall_s"} for r in rs]
    assert without_times(json.loads((docs / "waterbirds-lite.json").read_text())) == without_times(records)


def test_pretraining_shows_birds_and_names_their_superclass_at_the_set_rates(tmp_path):
    stamps, scenes = build.load_labels()
    material = build.Material(stamps, scenes, image_size=16)
    split = build.make_split(stamps, scenes, "shared", 0, 0.6)
    sizes = build.Sizes(image_size=16, pretrain=600, p_pretrain_bird=0.7, p_pretrain_superclass=0.8)
    build.write_pretrain(str(tmp_path), material, split, sizes, seed=0)
    shards = sorted(str(p) for p in (tmp_path / "pretrain").glob("*.tar"))
    captions = [s["txt"].decode() for s in wds.WebDataset(shards, shardshuffle=False)]
    assert len(captions) == 600
    bird_names = {s.name for s in stamps if s.kind != "object"}
    birds = [c for c in captions if "waterbird" in c or "landbird" in c or any(f" {b}" in c for b in bird_names)]
    superclass = [c for c in birds if "waterbird" in c or "landbird" in c]
    # binomial 3-sigma bounds around the set rates
    assert abs(len(birds) / 600 - 0.7) < 3 * (0.7 * 0.3 / 600) ** 0.5
    assert abs(len(superclass) / len(birds) - 0.8) < 3 * (0.8 * 0.2 / len(birds)) ** 0.5
    alone = [c for c in superclass if c.startswith(("a photo of a waterbird.", "a photo of a landbird.",
                                                    "a photo of a waterbird ", "a photo of a landbird "))]
    assert 0.3 < len(alone) / len(superclass) < 0.7  # the superclass alone or with the species, equally often


def test_units_whose_zero_shot_model_is_below_the_bar_are_left_out_with_a_line(tmp_path):
    from studies.waterbirds_lite.cli import competent_units
    (tmp_path / "zero_shot.json").write_text(json.dumps({"a-p0": {"val_avg": 0.8}, "b-p0": {"val_avg": 0.6}}))
    lines = []
    kept, failed = competent_units(str(tmp_path), ["a-p0", "b-p0"], 0.75, lines.append)
    assert kept == ["a-p0"] and list(failed) == ["b-p0"]
    assert len(lines) == 1 and "b-p0 left out" in lines[0] and "60.0 %" in lines[0]
    with pytest.raises(StarftError, match="no unit's zero-shot model reached a validation average of 90 %"):
        competent_units(str(tmp_path), ["a-p0", "b-p0"], 0.9, lines.append)
    # 'all' goes one unit at a time: a unit left out is named, and the study goes on to the next
    assert competent_units(str(tmp_path), ["b-p0"], 0.75, lines.append, allow_none=True) == ([], {"b-p0": {"val_avg": 0.6}})
    with pytest.raises(StarftError, match="unit c-p0 has no zero-shot check"):
        competent_units(str(tmp_path), ["c-p0"], 0.5, lines.append)


def _rec(method, unit, seed, wg, in_dist, *, lam=0.0, alpha=None, selected=False, val_wg=0.5):
    return {"protocol": "P1", "method": method, "unit": unit, "variant": "shared", "seed": seed, "lam": lam,
            "schedule": "constant" if lam else None, "descriptors": "background" if lam else None, "alpha": alpha,
            "worst_group": wg, "in_dist": in_dist, "avg": 0.5, "heldout": 0.5, "selected": selected,
            "val_worst_group": val_wg, "val_in_dist": 0.5, "val_avg": 0.5}


def test_report_statistics_by_hand():
    m, h = report.mean_ci([0.1, 0.3])
    assert m == pytest.approx(0.2) and h == pytest.approx(12.706205 * (0.02 ** 0.5) / (2 ** 0.5), rel=1e-6)
    recs = []
    # unit a: two training seeds (averaged within the unit first); unit b: one
    for unit, seed, flyp_wg, starft_wg in (("a", 0, 0.3, 0.4), ("a", 1, 0.3, 0.2), ("b", 0, 0.2, 0.5)):
        recs += [_rec("flyp", unit, seed, flyp_wg, 0.8), _rec("starft", unit, seed, starft_wg, 0.7, lam=2.0, selected=True)]
        # WiSE-FT(FLYP) from the zero-shot point (wg 0.6, in-dist 0.6) to FLYP: at in-dist 0.7 halfway
        recs.append(_rec("wise-flyp", unit, seed, (0.6 + flyp_wg) / 2, 0.7, alpha=0.5))
    recs += [_rec("zero-shot", u, None, 0.6, 0.6) for u in ("a", "b")]
    s = report.headline(recs, "P1", "shared")
    d = s["StarFT (selected) − FLYP: worst group"]
    assert d["per_unit"] == pytest.approx({"a": 0.0, "b": 0.3}) and d["units"] == 2
    assert (d["wins"], d["ties"], d["losses"]) == (1, 1, 0)
    matched = s["StarFT (selected) − WiSE-FT(FLYP) at its in-dist: worst group"]["per_unit"]
    assert matched == pytest.approx({"a": (0.4 - 0.45 + 0.2 - 0.45) / 2, "b": 0.5 - 0.4})
    assert s["FLYP − zero-shot: worst group"]["per_unit"] == pytest.approx({"a": -0.3, "b": -0.4})
    assert s["_clamped"] == 0
    # the nearest evaluated point: here the α 0.5 point sits at StarFT's in-dist, so it equals the linear reading
    assert s[report.NEAREST]["per_unit"] == pytest.approx(matched)
    assert s["StarFT (selected) − zero-shot: worst group"]["per_unit"] == pytest.approx({"a": -0.3, "b": -0.1})
    # a's two runs are dominated by the α 0.5 point (worst group 0.45 ≥ 0.4 and 0.2 at the same in-dist), b's is not
    assert s["_dominated"] == {"runs": 2, "of": 3}
    curve = [{"in_dist": 0.6, "worst_group": 0.6}, {"in_dist": 0.75, "worst_group": 0.5},
             {"in_dist": 0.8, "worst_group": 0.3}]
    assert report.nearest_point_worst_group(curve, 0.7) == 0.5
    assert report.matched_worst_group(curve, 0.7)[0] == pytest.approx(0.6 - 0.1 * 0.1 / 0.15)
    assert report.dominated_by(curve, {"in_dist": 0.7, "worst_group": 0.5})
    assert not report.dominated_by(curve, {"in_dist": 0.7, "worst_group": 0.55})
    # the report's sentences follow the intervals: +15 ± 190.6 includes 0; -35 ± 63.5 ... includes 0 with 2 units
    reading = report.reading_lines(recs, "P1")
    assert "- shared, StarFT (selected) − FLYP: worst group: +15.0 ± 190.6 (2 units; W/T/L 1/1/0) points, " \
           "not distinguishable from 0 (the interval includes 0)." in reading
    # reading (a): the paper's default (λ 0.5 linear, background), where the grid ran it; unit a's seed 0 only
    recs.append({**_rec("starft", "a", 0, 0.35, 0.72, lam=0.5), "schedule": "linear"})
    paper = report.headline(recs, "P1", "shared")
    assert paper[f"{report.PAPER} − FLYP: worst group"]["per_unit"] == pytest.approx({"a": 0.05})
    assert paper[f"{report.PAPER} − FLYP: in-dist"]["per_unit"] == pytest.approx({"a": -0.08})
    # WiSE-FT(FLYP) of a's seed 0 runs (0.6, 0.6) → (0.45, 0.7) → (0.3, 0.8): at in-dist 0.72 worst group 0.42,
    # and the nearest evaluated point is α 0.5's (0.45)
    assert paper[f"{report.PAPER} − WiSE-FT(FLYP) at its in-dist: worst group"]["per_unit"] == pytest.approx({"a": -0.07})
    assert paper[f"{report.PAPER} − WiSE-FT(FLYP), nearest evaluated α point: worst group"]["per_unit"] == \
        pytest.approx({"a": -0.1})
    assert "StarFT (selected) − FLYP: worst group" in paper and f"{report.PAPER} − FLYP: worst group" not in s
    # the same setting with the scenes' own phrases is read beside it, apart (unit b's seed 0)
    recs.append({**_rec("starft", "b", 0, 0.26, 0.75, lam=0.5), "schedule": "linear", "descriptors": "scenes"})
    both = report.headline(recs, "P1", "shared")
    assert both[f"{report.PAPER_SCENES} − FLYP: worst group"]["per_unit"] == pytest.approx({"b": 0.06})
    assert both[f"{report.PAPER} − FLYP: worst group"]["per_unit"] == pytest.approx({"a": 0.05})
    assert report._verdict({"mean": 0.1, "ci95": 0.05, "units": 5}).startswith("above 0")
    assert report._verdict({"mean": -0.1, "ci95": 0.05, "units": 5}).startswith("below 0")
    assert report._verdict({"mean": -0.1, "ci95": 0.0, "units": 1}) == "one unit: no interval"


def test_shared_split_never_composes_a_training_image_on_a_validation_or_test_photograph(tmp_path):
    """Every image of every set of shared-s0, traced to the photograph it was composed on: pre-training,
    Waterbirds-lite train and P1's source-train use train photographs only; val and test sets their own."""
    stamps, scenes = build.load_labels()
    material = build.Material(stamps, scenes, image_size=16)
    split = build.make_split(stamps, scenes, "shared", 0, 0.6)
    used, compose = [], material.compose

    def traced(stamp, scene, rng):
        used[-1][1].add(scene)
        return compose(stamp, scene, rng)
    material.compose = traced
    write_set = build._write_set

    def tracing_write_set(out_dir, *args, **kwargs):
        used.append((out_dir.rsplit("/", 1)[-1], set()))
        return write_set(out_dir, *args, **kwargs)
    build._write_set = tracing_write_set
    try:
        sizes = build.Sizes(image_size=16, pretrain=200, wb_train=60, wb_val=40, wb_test=40, source_train=60,
                            source_val=40, source_test=40, heldout_test=40)
        build.write_split(str(tmp_path), material, split, sizes, seed=0)
    finally:
        build._write_set = write_set
    part_of = {i: part for place in build.PLACES for part, idx in split["scenes"][place].items() for i in idx}
    expected = {"pretrain": "train", "wb-train": "train", "source-train": "train", "wb-val": "val",
                "source-val": "val", "wb-test": "test", "source-test": "test", "heldout-test": "test"}
    assert {name for name, _ in used} == set(expected)
    for name, scene_ids in used:
        assert {part_of[i] for i in scene_ids} == {expected[name]}, name
    val_test = {i for i, part in part_of.items() if part != "train"}
    assert val_test and not val_test & set().union(*(ids for n, ids in used if expected[n] == "train"))


def test_v3_pretraining_locks_the_image_trunk_unless_told_how_many_groups_to_leave_open(tmp_path):
    from studies.waterbirds_lite import benchmark
    from studies.waterbirds_lite.cli import SCALES, _scale, build_parser
    assert SCALES["full"]["model"]["vision_tower"] == "efficientnet-lite0"
    manifest = {"splits": {"shared-s0": {"sets": {"pretrain": {"pattern": str(tmp_path / "pretrain-000000.tar")}}}}}
    for argv, lock in (([], ["--lock-image", "--lock-image-unlocked-groups", "0"]),
                       (["--pretrain-unlocked-groups", "2"], ["--lock-image", "--lock-image-unlocked-groups", "2"])):
        schedule = _scale(build_parser("pretrain").parse_args(["--scale", "v3-host", *argv]))["schedule"]
        args = benchmark.pretrain(str(tmp_path), manifest, "shared-s0", 0, schedule, "local-dir:x").args
        at = args.index("--lock-image")
        assert args[at:at + 3] == lock and "--lock-image-freeze-bn-stats" not in args
    v2 = _scale(build_parser("pretrain").parse_args(["--scale", "v2"]))["schedule"]
    assert "--lock-image" not in benchmark.pretrain(str(tmp_path), manifest, "shared-s0", 0, v2, "local-dir:x").args
    with pytest.raises(StarftError, match="--pretrain-unlocked-groups 1: .*locks the image trunk"):
        _scale(build_parser("pretrain").parse_args(["--scale", "v2", "--pretrain-unlocked-groups", "1"]))


def test_lit_pretraining_caches_exactly_what_the_model_computes(tmp_path):
    """The cached tower outputs LiT pre-training trains on, passed through the projections, are the model's own
    ``encode_image`` (eval mode) and ``encode_text``: caching changes no value."""
    import open_clip
    from studies.waterbirds_lite import lit
    from studies.waterbirds_lite.clip_lite import write_clip_lite
    name = write_clip_lite(str(tmp_path / "m"), seed=3, vision_tower="efficientnet-lite0", image_size=32,
                           embed_dim=64, context_length=16)
    model, _, _ = open_clip.create_model_and_transforms(name)
    model.eval()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(name)(["a photo of a duck.", "a photo of a landbird, a robin on a lawn.", "x"])
    with torch.no_grad():
        assert torch.allclose(model.visual.head(lit.trunk_features(model, images, batch_size=4)),
                              model.encode_image(images), atol=1e-6)
        assert torch.allclose(model.text.proj(lit.text_pooled(model, tokens, batch_size=2)), model.encode_text(tokens),
                              atol=1e-6)


def test_a_run_folder_started_with_other_flags_is_refused(tmp_path):
    """Another scale or recipe in the same OUT: a fine-tune folder started with other flags is neither
    reused nor resumed; the same flags under a moved OUT are the same run."""
    from studies.waterbirds_lite.benchmark import Job, run_job
    logs = tmp_path / "out" / "logs"
    logs.mkdir(parents=True)
    flags = ["--epochs", "3", "--model", f"local-dir:{tmp_path / 'out' / 'models' / 'u' / 'zero-shot'}"]
    job = Job("P1-u-seed0-flyp-e3", [*flags, "--starft-freeze-bn-stats"], str(logs))
    (logs / "P1-u-seed0-flyp-e3.flags.json").write_text(json.dumps(["--epochs", "3", "--model",
                                                                    "local-dir:OUT/models/u/zero-shot"]))
    with pytest.raises(StarftError, match="started with other flags.*--starft-freeze-bn-stats.*fresh --out"):
        run_job(job)
    moved = Job(job.name, flags, str(logs))
    assert moved.portable_flags() == json.loads((logs / "P1-u-seed0-flyp-e3.flags.json").read_text())
    moved.check_flags()  # the recorded flags: no refusal
    fresh = Job("P1-u-seed0-flyp-e1", flags, str(tmp_path / "new-out" / "logs"))  # a first call: no logs folder yet
    fresh.check_flags()


def test_readmes_waterbirds_lite_table_is_the_shipped_study_recomputed(readme_row):
    """README's Waterbirds-lite table quotes ``report.headline`` of the shipped records (recomputed here): a unit
    added to the records without README following, or a number typed by hand, fails."""
    import os
    root = os.path.join(os.path.dirname(__file__), "..")
    records = json.load(open(os.path.join(root, "docs", "waterbirds-lite-transfer", "waterbirds-lite.json")))
    s = report.headline(records, "P1", "transfer")
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    section = readme.split("**Waterbirds-lite on the paper's protocol")[1].split("## Training")[0]
    units = s["FLYP − zero-shot: worst group"]["units"]
    assert section.startswith(f": {units} units**"), section[:40]
    for row, key in [("premise: FLYP − zero-shot", "FLYP − zero-shot: worst group"),
                     ("(a) the paper's λ 0.5 linear − FLYP", f"{report.PAPER} − FLYP: worst group"),
                     ("(a) the same with the scenes' own phrases − FLYP", f"{report.PAPER_SCENES} − FLYP: worst group"),
                     ("(a) the paper's λ 0.5 linear − WiSE-FT(FLYP) at its source accuracy, interpolated",
                      f"{report.PAPER} − WiSE-FT(FLYP) at its in-dist: worst group"),
                     (") − FLYP", "StarFT (selected) − FLYP: worst group"),
                     ("(c) that choice − WiSE-FT(FLYP) at its source accuracy, interpolated",
                      "StarFT (selected) − WiSE-FT(FLYP) at its in-dist: worst group"),
                     ("(c) the same, nearest α", report.NEAREST)]:
        assert f"{row} | {readme_row(s[key])}" in section, row
