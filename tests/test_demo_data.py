import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from open_clip_starft.demo import data as dd

N_CLS, N_BG = len(dd.CLASSNAMES), len(dd.BACKGROUNDS)


def read_tar_samples(paths):
    """{key: {ext: bytes}} for all members of the given tar files."""
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def own_background_share(samples):
    """Per-class and overall share of samples whose background index equals the class index."""
    cls = np.array([int(s["cls"]) for s in samples.values()])
    bg = np.array([int(s["group"]) for s in samples.values()]) % N_BG
    per_class = [np.mean(bg[cls == k] == k) for k in range(N_CLS)]
    return per_class, np.mean(bg == cls)


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    out = tmp_path_factory.mktemp("biased")
    return out, dd.write_shards(str(out), 400, seed=3, samples_per_shard=64)


@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    out = tmp_path_factory.mktemp("balanced")
    return out, dd.write_shards(str(out), 400, seed=3, biased=False, samples_per_shard=100)


def test_constants():
    assert dd.CLASSNAMES == ["circle", "square", "triangle", "cross"]
    assert dd.BACKGROUNDS == ["water", "grass", "sand", "snow"]
    assert set(dd.BACKGROUND_PHRASES) == set(dd.BACKGROUNDS)
    assert dd.BACKGROUND_PHRASES["water"] == "on the water"


def test_shards_and_sizes_json(biased):
    out, paths = biased
    assert paths == sorted(paths)
    assert [os.path.basename(p) for p in paths] == [f"shard-{i:06d}.tar" for i in range(7)]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {f"shard-{i:06d}.tar": 64 for i in range(6)} | {"shard-000006.tar": 16}
    pattern = dd.brace_pattern(paths)
    assert pattern == os.path.join(str(out), "shard-{000000..000006}.tar")
    from open_clip_train.data import get_dataset_size
    assert get_dataset_size(pattern) == (400, 7)


def test_sample_contents(biased):
    _, paths = biased
    samples = read_tar_samples(paths)
    assert sorted(samples) == [f"s{i:06d}" for i in range(400)]
    for key, s in samples.items():
        assert set(s) == {"jpg", "cls", "group", "txt"}
        cls, group = int(s["cls"]), int(s["group"])
        assert 0 <= cls < N_CLS and group // N_BG == cls and 0 <= group < N_CLS * N_BG
        bg = dd.BACKGROUNDS[group % N_BG]
        assert s["txt"].decode() == f"a photo of a {dd.CLASSNAMES[cls]} {dd.BACKGROUND_PHRASES[bg]}."
    # all classes and (through the 10 % off-diagonal) many groups occur
    assert len({int(s["cls"]) for s in samples.values()}) == N_CLS
    assert len({int(s["group"]) for s in samples.values()}) >= 12


def test_webdataset_decode(biased):
    _, paths = biased
    ds = wds.WebDataset(dd.brace_pattern(paths), shardshuffle=False).decode("pil")
    n = 0
    for s in ds:
        assert s["jpg"].mode == "RGB" and s["jpg"].size == (64, 64)
        assert isinstance(s["cls"], int)
        n += 1
    assert n == 400


def test_biased_split(biased):
    _, paths = biased
    _, overall = own_background_share(read_tar_samples(paths))
    assert abs(overall - 0.9) <= 0.06


def test_balanced_split(balanced):
    out, paths = balanced
    assert len(paths) == 4
    per_class, _ = own_background_share(read_tar_samples(paths))
    assert all(abs(p - 0.25) <= 0.10 for p in per_class), per_class


def test_determinism(tmp_path, biased):
    _, paths = biased
    # same seed, different shard layout: identical bytes per sample
    again = dd.write_shards(str(tmp_path / "a"), 400, seed=3, samples_per_shard=150)
    assert read_tar_samples(again) == read_tar_samples(paths)
    # same seed and layout: identical tar files
    (first_shard,) = dd.write_shards(str(tmp_path / "b"), 64, seed=3, samples_per_shard=64)
    assert open(first_shard, "rb").read() == open(paths[0], "rb").read()
    # different seed: different images
    other = read_tar_samples(dd.write_shards(str(tmp_path / "c"), 20, seed=4))
    first = read_tar_samples(again)
    assert all(other[k]["jpg"] != first[k]["jpg"] for k in other)


def test_image_size_and_prefix(tmp_path):
    paths = dd.write_shards(str(tmp_path), 5, seed=0, image_size=32, prefix="val")
    assert [os.path.basename(p) for p in paths] == ["val-000000.tar"]
    assert dd.brace_pattern(paths) == paths[0]
    for s in read_tar_samples(paths).values():
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    # a second prefix in the same dir keeps the first one's sizes.json entry
    dd.write_shards(str(tmp_path), 3, seed=0, prefix="train")
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"val-000000.tar": 5, "train-000000.tar": 3}


def test_brace_pattern_rejects_gaps():
    with pytest.raises(ValueError):
        dd.brace_pattern(["/d/shard-000000.tar", "/d/shard-000002.tar"])


def test_write_csv(tmp_path):
    path = dd.write_csv(str(tmp_path), 12, seed=5, biased=False, image_size=48)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 12 and list(rows[0]) == ["filepath", "label", "group", "title"]
    for i, row in enumerate(rows):
        img, cls, bg = dd.render_sample(i, seed=5, biased=False, p_spurious=0.9, image_size=48)
        assert os.path.isabs(row["filepath"])
        assert int(row["label"]) == cls and int(row["group"]) == cls * N_BG + bg
        assert row["title"].startswith(f"a photo of a {dd.CLASSNAMES[cls]} ")
        with Image.open(row["filepath"]) as png:
            assert png.mode == "RGB" and png.size == (48, 48)
            assert np.array_equal(np.asarray(png), np.asarray(img))


def test_classes_visually_distinct():
    imgs = {c: np.asarray(dd.draw_image(c, 0, np.random.default_rng(7)), dtype=np.float32)
            for c in range(N_CLS)}
    for a in range(N_CLS):
        for b in range(a + 1, N_CLS):
            diff = np.abs(imgs[a] - imgs[b]).mean()
            assert diff > 3.0, (dd.CLASSNAMES[a], dd.CLASSNAMES[b], diff)
    # same rng state and class: identical image, so the differences above come from the shape
    again = np.asarray(dd.draw_image(0, 0, np.random.default_rng(7)), dtype=np.float32)
    assert np.array_equal(again, imgs[0])


def test_backgrounds_differ_in_mean_colour():
    means = []
    for bg in range(N_BG):
        # mean over the border pixels, which the shape rarely covers
        pix = [np.asarray(dd.draw_image(i % N_CLS, bg, np.random.default_rng(i)), dtype=np.float32)
               for i in range(8)]
        border = np.concatenate([np.concatenate([p[:4].reshape(-1, 3), p[-4:].reshape(-1, 3)]) for p in pix])
        means.append(border.mean(0))
    for a in range(N_BG):
        for b in range(a + 1, N_BG):
            assert np.linalg.norm(means[a] - means[b]) > 30, (dd.BACKGROUNDS[a], dd.BACKGROUNDS[b])
