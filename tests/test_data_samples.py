"""The sample format: labels, 16/32-bit-safe RGB decoding, the one shard writer, the checked shard reader."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from open_clip_starft.data.samples import (BrokenShard, brace_pattern, iter_shard, open_rgb, parse_label, to_rgb,
                                           write_shard, write_shards)


def test_parse_label():
    assert [parse_label(v) for v in (b"3\n", "4", 5, "2.0", b"x", "1.5", None, b"\xff", "nan")] == [3, 4, 5, 2, None, None, None, None, None]


@pytest.mark.parametrize("mode,array,expected", [
    ("I;16", np.full((4, 4), 40000, np.uint16), 156),       # 40000 / 257
    ("I;16", np.full((4, 4), 65535, np.uint16), 255),
    ("I;16B", np.full((4, 4), 257 * 100, ">u2"), 100),
    ("I", np.full((4, 4), 257 * 30, np.int32), 30),           # 16-bit range in a 32-bit image
    ("I", np.full((4, 4), 200, np.int32), 200),               # already 8-bit range
    ("F", np.full((4, 4), 0.5, np.float32), 128),              # 0..1 floats
])
def test_high_bit_depth_images_are_scaled_not_clipped(mode, array, expected):
    image = Image.fromarray(array)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (expected,) * 3


def test_a_16_bit_gradient_keeps_its_shape():
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    out = np.asarray(to_rgb(Image.fromarray(ramp)))[..., 0]
    assert np.array_equal(out.reshape(-1), np.arange(256))


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "CMYK", "1", "RGB"])
def test_other_modes_go_through_pillow(mode):
    image = Image.new("RGB", (4, 4), (10, 200, 30)).convert(mode)
    assert to_rgb(image).tobytes() == image.convert("RGB").tobytes()


def test_open_rgb_from_bytes_path_and_file(tmp_path):
    image = Image.fromarray(np.full((4, 4), 40000, np.uint16))
    path = tmp_path / "x.png"
    image.save(path)
    data = path.read_bytes()
    for source in (data, str(path), path, io.BytesIO(data)):
        assert open_rgb(source).getpixel((0, 0)) == (156, 156, 156)
    with pytest.raises(OSError):
        open_rgb(data[: len(data) // 2])  # a truncated file fails where it is opened


def test_write_shards_sizes_and_brace_pattern(tmp_path):
    samples = ({"__key__": f"k{i}", "jpg": b"\xff" * 10, "cls": i, "group": 0, "txt": "a b", "json": {"i": i}}
               for i in range(7))
    paths = write_shards(str(tmp_path), samples, prefix="tr", samples_per_shard=3)
    assert [os.path.basename(p) for p in paths] == ["tr-000000.tar", "tr-000001.tar", "tr-000002.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"tr-000000.tar": 3, "tr-000001.tar": 3, "tr-000002.tar": 1}
    assert brace_pattern(paths) == str(tmp_path / "tr-{000000..000002}.tar")
    first = next(iter_shard(paths[0]))
    assert first["cls"] == b"0" and first["txt"] == b"a b" and json.loads(first["json"]) == {"i": 0}
    # a second prefix keeps the first one's entries; rewriting a prefix with fewer shards drops its stale ones
    write_shards(str(tmp_path), [{"__key__": "v", "jpg": b"1", "cls": 1}], prefix="val")
    write_shards(str(tmp_path), [{"__key__": "t", "jpg": b"1", "cls": 1}], prefix="tr")
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"tr-000000.tar": 1, "val-000000.tar": 1}
    with pytest.raises(ValueError):
        brace_pattern([paths[0], paths[2]])


def test_write_shard_is_atomic(tmp_path):
    path = str(tmp_path / "s.tar")

    def failing():
        yield {"__key__": "a", "jpg": b"1"}
        raise RuntimeError("the source broke")
    with pytest.raises(RuntimeError):
        write_shard(path, failing())
    assert os.listdir(tmp_path) == []  # neither a half shard nor a .partial left behind
    with pytest.raises(TypeError, match="'cls'"):
        write_shard(path, [{"__key__": "a", "cls": 1.5}])
    assert write_shard(path, [{"__key__": "a", "jpg": b"1"}]) == 1
    first = open(path, "rb").read()
    assert write_shard(path, [{"__key__": "a", "jpg": b"1"}]) == 1 and open(path, "rb").read() == first  # fixed mtime


def shard_of(tmp_path, n=16):
    return write_shards(str(tmp_path), ({"__key__": f"s{i:03d}", "jpg": bytes([i]) * 700, "cls": i} for i in range(n)),
                        samples_per_shard=n)[0]


def read(path):
    return [s["__key__"] for s in iter_shard(path)]


def test_iter_shard_reads_a_whole_shard(tmp_path):
    path = shard_of(tmp_path)
    assert read(path) == [f"s{i:03d}" for i in range(16)]
    empty = str(tmp_path / "empty.tar")
    with tarfile.open(empty, "w"):
        pass
    assert read(empty) == []


@pytest.mark.parametrize("where", ["inside a header", "at a member boundary", "inside a member", "garbage header"])
def test_iter_shard_detects_a_cut_tar(tmp_path, where):
    path = shard_of(tmp_path)
    raw = bytearray(open(path, "rb").read())
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[14].offset  # sample 7's first member
    if where == "inside a header":
        raw = raw[:offset + 100]
    elif where == "at a member boundary":
        raw = raw[:offset]
    elif where == "inside a member":
        raw = raw[:offset + 512 + 300]
    else:
        raw[offset:offset + 512] = b"\xee" * 512
    with open(path, "wb") as f:
        f.write(raw)
    keys = []
    with pytest.raises(BrokenShard) as e:
        for sample in iter_shard(path):
            keys.append(sample["__key__"])
    assert path in str(e.value) and e.value.samples == len(keys) and 6 <= len(keys) <= 7
    assert keys == [f"s{i:03d}" for i in range(len(keys))]  # complete samples only, in order
    import webdataset as wds  # what webdataset alone does with it: stops quietly, or a half sample
    if where != "inside a member":
        assert sum(1 for _ in wds.WebDataset(path, shardshuffle=False)) <= 8


def test_iter_shard_names_an_unreadable_file(tmp_path):
    path = tmp_path / "zero.tar"
    path.write_bytes(b"")
    with pytest.raises(BrokenShard, match="zero.tar"):
        read(str(path))
    with pytest.raises(BrokenShard, match="cannot open"):
        read(str(tmp_path / "missing.tar"))


def test_make_shards_writes_a_16_bit_png_as_its_grey_not_white(tmp_path):
    # issue 13 case 2: make-shards wrote solid-white JPEGs from I;16 PNGs
    from open_clip_starft.tools.make_shards import make_shards

    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "tree" / cls / "x.png")
    manifest = make_shards(str(tmp_path / "tree"), str(tmp_path / "out"), progress=False)
    assert manifest["samples"] == 2
    for sample in iter_shard(str(tmp_path / "out" / "shard-000000.tar")):
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"))
        assert abs(float(pixels.mean()) - 156) <= 2


def test_update_sizes_is_the_one_merge_rule(tmp_path):
    from open_clip_starft.data.samples import update_sizes

    (tmp_path / "sizes.json").write_text(json.dumps({"a-000000.tar": 5, "a-000001.tar": 5, "a-b-000000.tar": 2, "x": 1}))
    merged = update_sizes(str(tmp_path), "a", {"a-000000.tar": 4})
    # the stale a-000001 goes; another prefix that starts with "a-" and a foreign key stay
    assert merged == json.loads((tmp_path / "sizes.json").read_text()) == {"a-000000.tar": 4, "a-b-000000.tar": 2, "x": 1}
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]
