"""``open-clip-starft make-shards``: the round trip through the training pipeline, unreadable images,
and a resumed run after an interruption."""
import json
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
    manifest = ms.make_shards(str(src / "tree"), str(out), samples_per_shard=5, workers=2, progress=False, log=lambda *_: None)
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
    manifest = ms.make_shards(str(src / "data.csv"), str(out), samples_per_shard=8, workers=1, progress=False, log=lambda *_: None)
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
    quiet = dict(samples_per_shard=4, workers=1, progress=False, log=lambda *_: None)
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

    with pytest.raises(ms.StarftError, match="holds shards of another source or settings"):
        ms.make_shards(str(src / "data.csv"), str(out), samples_per_shard=3, workers=1, progress=False, log=lambda *_: None)


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = ms.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("open-clip-starft: error: source") and "missing" in err[0]
    csv = tmp_path / "ids.csv"
    csv.write_text("path,label\na.jpg,0\n")
    rc = ms.main([str(csv), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pass --classnames" in err[0]
