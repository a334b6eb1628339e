"""``open-clip-starft make-shards``: the round trip through the training pipeline, unreadable images,
a resumed run after an interruption, symlinked folders and files, restored images, a run that writes
nothing, and file names that are not UTF-8."""
import json
import logging
import os
from types import SimpleNamespace

import open_clip
import pytest
import webdataset as wds
from PIL import Image
from torchvision.transforms import PILToTensor

from open_clip_starft.tools import make_shards as ms
from open_clip_starft.method.captions import CaptionBuilder
from open_clip_starft.data.training import get_wds_train_data
from open_clip_starft.demo.data import CLASSNAMES, render_sample
from open_clip_starft.errors import ConfigError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """22 JPEGs in class folders, one corrupt file, and a CSV (relative paths, label names, groups) over them."""
    root = tmp_path_factory.mktemp("src")
    rows = ["path,label,group"]
    for i in range(22):
        img, cls, bg = render_sample(i, seed=7, biased=False, image_size=32)
        os.makedirs(root / "tree" / CLASSNAMES[cls], exist_ok=True)
        img.save(root / "tree" / CLASSNAMES[cls] / f"{i:02d}.jpg", quality=90)
        rows.append(f"tree/{CLASSNAMES[cls]}/{i:02d}.jpg,{CLASSNAMES[cls]},{bg}")
    (root / "tree" / CLASSNAMES[1] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.append(f"tree/{CLASSNAMES[1]}/broken.jpg,{CLASSNAMES[1]},0")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root


def _tensor_key(t):
    return t.numpy().tobytes()


def test_tree_round_trip_through_the_training_pipeline(src, tmp_path):
    out = tmp_path / "shards"
    manifest = ms.make_shards(str(src / "tree"), str(out), samples_per_shard=5, workers=2, progress=False)
    assert manifest["complete"] and manifest["samples"] == 22 and manifest["shards"] == 5
    assert [s["path"] for s in manifest["skipped"]] == [str(src / "tree" / CLASSNAMES[1] / "broken.jpg")]
    assert (out / "classnames.txt").read_text().split("\n")[:4] == sorted(CLASSNAMES)
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 22
    assert manifest["train_args"] == f"--train-data '{out}/shard-{{000000..000004}}.tar' --dataset-type webdataset --train-num-samples 22"

    names = (out / "classnames.txt").read_text().split()
    args = SimpleNamespace(train_data=manifest["pattern"], train_num_samples=None, dataset_resampled=False,
                           train_data_upsampling_factors=None, workers=0, world_size=1, seed=0, rank=0, batch_size=1)
    data = get_wds_train_data(args, PILToTensor(), CaptionBuilder(names, suffix="none"), tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    got = {}
    for images, texts, _, labels in data.dataloader:
        key = _tensor_key(images[0])
        assert key not in got  # no sample twice
        got[key] = int(labels[0])
    assert len(got) == 22
    for cls in names:
        for f in os.listdir(src / "tree" / cls):
            if f != "broken.jpg":
                image = PILToTensor()(Image.open(src / "tree" / cls / f).convert("RGB"))
                assert got[_tensor_key(image)] == names.index(cls)


def test_csv_groups_paths_and_original_bytes(src, tmp_path):
    out = tmp_path / "csv-shards"
    manifest = ms.make_shards(str(src / "data.csv"), str(out), samples_per_shard=8, workers=1, progress=False)
    assert manifest["samples"] == 22 and len(manifest["skipped"]) == 1
    rows = [line.split(",") for line in (src / "data.csv").read_text().splitlines()[1:]]
    want = {str(src / p): (sorted(CLASSNAMES).index(lab), int(g)) for p, lab, g in rows if "broken" not in p}
    assert manifest["per_group"] == {str(g): sum(1 for _, gg in want.values() if gg == g) for g in sorted({g for _, g in want.values()})}
    seen = {}
    for sample in wds.WebDataset(manifest["pattern"], shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["path"] not in seen
        seen[meta["path"]] = (int(sample["cls"]), int(sample["group"]))
        assert meta["classname"] == sorted(CLASSNAMES)[meta["label"]] and meta["group"] == int(sample["group"])
        with open(meta["path"], "rb") as f:
            assert sample["jpg"] == f.read()  # JPEGs are stored as they are
    assert seen == want


def test_resume_after_an_interruption_keeps_complete_shards_and_duplicates_nothing(src, tmp_path):
    out = tmp_path / "resume"
    quiet = dict(samples_per_shard=4, workers=1, progress=False)
    first = ms.make_shards(str(src / "data.csv"), str(out), limit_shards=2, **quiet)  # stopped after two shards
    assert not first["complete"] and first["shards_complete"] == 2 and first["shards"] == 6
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("shard-000000.tar", "shard-000001.tar")}
    (out / "shard-000002.tar.partial").write_bytes(b"half a shard")   # a shard cut off mid-write
    (out / "shard-000003.tar").write_bytes(b"not a finished shard")   # a final name without its record
    done = ms.make_shards(str(src / "data.csv"), str(out), **quiet)
    assert done["complete"] and done["samples"] == 22
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    keys = [s["__key__"] for s in wds.WebDataset(done["pattern"], shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 22

    with pytest.raises(ConfigError, match=r"holds shards of another source or settings \(settings changed: "
                                          r"samples_per_shard 4 → 3\).*--overwrite"):
        ms.make_shards(str(src / "data.csv"), str(out), samples_per_shard=3, workers=1, progress=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = ms.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("open-clip-starft: error: source") and "missing" in err[0]
    csv = tmp_path / "ids.csv"
    csv.write_text("path,label\na.jpg,0\n")
    rc = ms.main([str(csv), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pass --classnames" in err[0]


def _tree(root, counts, seed=0):
    """Class folders ``{class: n}`` of distinct 32-px JPEGs ``NN.jpg``; returns {path: class}."""
    made, i = {}, seed
    for cls, n in counts.items():
        os.makedirs(root / cls, exist_ok=True)
        for _ in range(n):
            img, _, _ = render_sample(i, seed=11, biased=False, image_size=32)
            img.save(root / cls / f"{i:02d}.jpg", quality=90)
            made[str(root / cls / f"{i:02d}.jpg")] = cls
            i += 1
    return made


def _read_back(manifest):
    """{path in the sample's json: (label, classname)} over every shard; fails on a path or image twice."""
    got, images = {}, set()
    for sample in wds.WebDataset(manifest["pattern"], shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["path"] not in got and sample["jpg"] not in images
        got[meta["path"]] = (int(sample["cls"]), meta["classname"])
        images.add(sample["jpg"])
    return got


def test_symlinked_folders_are_not_followed_and_files_count_once(tmp_path, caplog):
    # issue 20 item 4: `ln -s . tree/cat/loop; ln -s ../dog tree/cat/dogs_link` gave one image 41 times
    # and dog images labelled cat
    tree = tmp_path / "tree"
    made = _tree(tree, {"cat": 6, "dog": 5})
    os.symlink(".", tree / "cat" / "loop")
    os.symlink("../dog", tree / "cat" / "dogs_link")
    outside = tmp_path / "elsewhere.jpg"
    render_sample(99, seed=11, biased=False, image_size=32)[0].save(outside)
    os.symlink(outside, tree / "cat" / "outside.jpg")                   # a file link out of the tree
    os.symlink(tree / "dog" / "06.jpg", tree / "cat" / "also_dog.jpg")  # the same real file twice
    with caplog.at_level(logging.WARNING, logger=ms.LOG.name):
        manifest = ms.make_shards(str(tree), str(tmp_path / "out"), samples_per_shard=4, progress=False)
    assert manifest["complete"] and manifest["samples"] == 11 and manifest["per_class"] == {"cat": 6, "dog": 5}
    got = _read_back(manifest)
    assert got == {p: (["cat", "dog"].index(c), c) for p, c in made.items()}  # every real file once, labelled right
    assert {k: v["count"] for k, v in manifest["left_out"].items()} == {ms.SYMLINKED_FOLDER: 2, ms.LINK_OUT_OF_TREE: 1,
                                                                      ms.DUPLICATE: 1}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("left out")]
    assert sorted(lines) == sorted([f"left out 2 {ms.SYMLINKED_FOLDER} (e.g. {tree / 'cat' / 'dogs_link'})",
                                    f"left out 1 {ms.LINK_OUT_OF_TREE} (e.g. {tree / 'cat' / 'outside.jpg'} -> {outside})",
                                    f"left out 1 {ms.DUPLICATE} (e.g. {tree / 'cat' / 'also_dog.jpg'} (= {tree / 'dog' / '06.jpg'}))"])


def test_a_run_that_writes_no_sample_fails_in_one_line(tmp_path, capsys):
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "tree" / cls)
        (tmp_path / "tree" / cls / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not an image")
    rc = ms.main([str(tmp_path / "tree"), str(tmp_path / "out"), "--no-progress", "--workers", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("open-clip-starft")]
    assert rc == 2 and len(err) == 1 and "wrote 0 samples: all 2 image(s)" in err[0] and "x.jpg" in err[0]
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "sizes.json").exists()


def test_a_rerun_adds_restored_images_and_a_changed_source_says_how_to_rebuild(tmp_path):
    tree = tmp_path / "tree"
    made = _tree(tree, {"a": 4, "b": 4})
    good = (tree / "a" / "01.jpg").read_bytes()
    (tree / "a" / "01.jpg").write_bytes(good[:40])  # damaged in the first run
    quiet = dict(samples_per_shard=3, progress=False)
    first = ms.make_shards(str(tree), str(tmp_path / "out"), **quiet)
    assert first["samples"] == 7 and [s["path"] for s in first["skipped"]] == [str(tree / "a" / "01.jpg")]
    (tree / "a" / "01.jpg").write_bytes(good)  # restored
    second = ms.make_shards(str(tree), str(tmp_path / "out"), **quiet)
    assert second["samples"] == 8 and second["skipped"] == [] and second["per_class"] == {"a": 4, "b": 4}
    assert set(_read_back(second)) == set(made)
    assert sum(json.loads((tmp_path / "out" / "sizes.json").read_text()).values()) == 8

    (tree / "b" / "05.jpg").unlink()  # an image gone, then another added: the shards no longer match
    with pytest.raises(ConfigError, match=r"source changed: it lists 7 image\(s\) now, 8 when.*--overwrite"):
        ms.make_shards(str(tree), str(tmp_path / "out"), **quiet)
    _tree(tree, {"b": 2}, seed=20)
    rebuilt = ms.make_shards(str(tree), str(tmp_path / "out"), overwrite=True, **quiet)
    assert rebuilt["samples"] == 9 and str(tree / "b" / "21.jpg") in _read_back(rebuilt)


def test_a_file_name_that_is_not_utf8_is_named_and_skipped(tmp_path, capsys):
    tree = tmp_path / "tree"
    _tree(tree, {"a": 2, "b": 2})
    odd = os.path.join(os.fsencode(tree / "b"), b"caf\xe9.jpg")  # Latin-1 bytes
    with open(odd, "wb") as f:
        f.write((tree / "a" / "00.jpg").read_bytes())
    rc = ms.main([str(tree), str(tmp_path / "out"), "--no-progress", "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 0 and "wrote 4 samples in 1 shard(s)" in captured.out and "train with: --train-data" in captured.out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["samples"] == 4 and manifest["left_out"][ms.NOT_UTF8]["count"] == 1
    assert manifest["left_out"][ms.NOT_UTF8]["example"] == repr(os.fsdecode(odd))
    assert not [n for n in os.listdir(tmp_path / "out") if ".partial" in n]
