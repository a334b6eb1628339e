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
from open_clip_starft.demo import run as demo_run

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


# ------------------------------------------------------------------------------------------------ transfer design
SIZES = {"pretrain": 160, "finetune": 160, "val": 64, "test": 64, "val_in_dist": 64, "test_in_dist": 64}


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    """The demo's parts for unit 0, as the demo writes them (small sizes)."""
    root = tmp_path_factory.mktemp("transfer")
    return demo_run.write_data(str(root), 0, sizes=SIZES)


def shard_samples(pattern):
    """[(fields decoded, RGB array)] of every sample of a brace pattern's shards, in key order."""
    from braceexpand import braceexpand
    out = []
    for key, s in sorted(read_tar_samples(list(braceexpand(pattern))).items()):
        fields = {"cls": int(s["cls"]), "group": int(s["group"]), "txt": s["txt"].decode(), **json.loads(s["json"])}
        out.append((fields, np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float32)))
    return out


def colour_pixels(pixels):
    """Pixels within 30 (RGB distance) of each palette colour: {colour name: count}. Background colours are
    farther than that from every palette colour, so this reads the object's colour from the pixels alone (edges
    blended with a background may look like another colour: the object's own colour dominates)."""
    flat = pixels.reshape(-1, 3)
    return {name: int((np.linalg.norm(flat - np.array(rgb), axis=1) < 30).sum()) for name, rgb in dd.COLOURS.items()}


def test_no_target_image_and_no_held_out_colour_in_any_finetune_shard(transfer):
    held_out = set(demo_run.DESIGN["target_colours"])
    finetune = shard_samples(transfer["finetune"])
    assert len(finetune) == SIZES["finetune"]
    def held_out_share(samples):
        """Of the pixels that match a palette colour, the share matching a held-out one; and how many images'
        dominant colour is held out (a small patterned object may match none: skipped)."""
        total = {c: 0 for c in dd.COLOURS}
        dominant = []
        for _, pixels in samples:
            counts = colour_pixels(pixels)
            total = {c: total[c] + counts[c] for c in total}
            if max(counts.values()) >= 5:
                dominant.append(max(counts, key=counts.get) in held_out)
        return sum(total[c] for c in held_out) / sum(total.values()), np.mean(dominant), len(dominant)

    for fields, _ in finetune:
        assert fields["colour"] not in held_out
        assert not any(c in fields["txt"] for c in held_out)
    share, dominant, read = held_out_share(finetune)
    assert share < 0.1 and dominant == 0 and read > 0.8 * len(finetune), (share, dominant, read)
    # the pixel check sees the held-out colours where they are: in every target image
    for part in ("val", "test"):
        share, dominant, read = held_out_share(shard_samples(transfer[part]))
        assert share > 0.9 and dominant == 1 and read == SIZES[part], (part, share, dominant, read)
    # and no target image (decoded pixels) is a fine-tuning image
    tuned = {p.tobytes() for _, p in finetune}
    assert not any(p.tobytes() in tuned for part in ("val", "test") for _, p in shard_samples(transfer[part]))


def test_transfer_parts_are_drawn_as_designed(transfer):
    pre = [f for f, _ in shard_samples(transfer["pretrain"])]
    # pre-training covers every concept; captions name shape (always), colour, background, never the pattern
    for key, values in (("colour", dd.COLOURS), ("shape", dd.SHAPES), ("pattern", dd.PATTERNS),
                        ("background", dd.BACKGROUNDS)):
        assert {f[key] for f in pre} == set(values), key
    assert all(f["shape"] in f["txt"] and not any(p in f["txt"] for p in dd.PATTERNS) for f in pre)
    assert 0.3 < np.mean([f["colour"] in f["txt"] for f in pre]) < 0.7  # p_colour 0.5
    assert 0.05 < np.mean(["on the" in f["txt"] or "in the" in f["txt"] for f in pre]) < 0.4  # p_background 0.2
    # source: 12 "pattern shape" classes, each shape on its own background 95 % of the time
    for part in ("finetune", "val_in_dist", "test_in_dist"):
        src = [f for f, _ in shard_samples(transfer[part])]
        assert all(dd.SOURCE_CLASSNAMES[f["cls"]] == f"{f['pattern']} {f['shape']}" for f in src)
        assert all(f["group"] == f["cls"] * 4 + dd.BACKGROUNDS.index(f["background"]) for f in src)
        own = np.mean([dd.BACKGROUNDS.index(f["background"]) == dd.SHAPES.index(f["shape"]) for f in src])
        assert own > 0.88, (part, own)
    # target: plain, class = shape, every background about equally often
    tgt = [f for part in ("val", "test") for f, _ in shard_samples(transfer[part])]
    assert all(f["pattern"] == "plain" and f["cls"] == dd.SHAPES.index(f["shape"]) for f in tgt)
    own = np.mean([dd.BACKGROUNDS.index(f["background"]) == f["cls"] for f in tgt])
    assert own < 0.4
    assert open(transfer["target_classnames"]).read().split("\n")[:4] == dd.SHAPES
    assert open(transfer["source_classnames"]).read().split("\n")[:12] == dd.SOURCE_CLASSNAMES


def test_patterns_differ_in_pixels():
    imgs = {p: np.asarray(dd.draw_object(0, 3, "red", p, np.random.default_rng(5), 32), dtype=np.float32)
            for p in dd.PATTERNS}
    for a in dd.PATTERNS:
        for b in dd.PATTERNS:
            if a < b:
                assert np.abs(imgs[a] - imgs[b]).mean() > 2.0, (a, b)
    with pytest.raises(ValueError, match="overlap"):
        dd.render_transfer_sample(0, seed=0, part="source", design={**demo_run.DESIGN, "source_colours": ["orange"]})


def test_units_never_share_an_image_in_any_part(tmp_path):
    """Part seeds come from (unit, part): no sample (decoded pixels) is shared between two parts of one unit or
    between units (unit seed + offset once made unit 1's test unit 0's validation set)."""
    import hashlib
    seen, seeds = {}, {}
    sizes = {part: 24 for part in demo_run.PART_IDS}
    for unit in (0, 1, 3):
        data = demo_run.write_data(str(tmp_path / f"u{unit}"), unit, sizes=sizes)
        for part in demo_run.PART_IDS:
            seeds[(unit, part)] = demo_run.part_seed(unit, part)
            samples = shard_samples(data[part])
            assert len(samples) == 24, (unit, part)
            for key, (_, pixels) in enumerate(samples):
                digest = hashlib.sha1(pixels.tobytes()).hexdigest()
                assert digest not in seen, f"{(unit, part, key)} repeats {seen[digest]}"
                seen[digest] = (unit, part, key)
    assert len(set(seeds.values())) == len(seeds)  # no (unit, part) draws from another's sample seed
    assert demo_run.part_seed(1, "test") != demo_run.part_seed(0, "val")  # the old scheme's collision
    with pytest.raises(Exception, match="seed -1 is negative"):
        demo_run.part_seed(-1, "val")
