"""The eval-set registry: layouts by name, detection in priority order, and the public listing
helpers that make-shards shares with eval."""
import os

import pytest

from open_clip_starft.eval import sets
from open_clip_starft.eval.sets import registry
from open_clip_starft.eval.sets.spec import EvalSetSpec, Item
from open_clip_starft.errors import StarftError


def test_every_layout_is_registered_once_and_listed_by_format():
    assert sets.FORMATS == ("auto", "folder", "domains", "wds", "csv", "clip_benchmark", "waterbirds", "cifar10.02", "objectnet")
    for name in sets.FORMATS[1:]:
        layout = sets.get_layout(name)
        assert layout.name == name and callable(layout.list_fn)
    with pytest.raises(StarftError, match="unknown eval-set format 'tiles'"):
        sets.get_layout("tiles")


def test_a_registered_layout_is_detected_and_prepared_like_the_built_in_ones(tmp_path, monkeypatch):
    root = tmp_path / "tiles"
    os.makedirs(root / "a")  # would be a 'folder' set, but the new layout's detector comes first
    (root / "TILES").write_text("3 2\n")

    def detect(spec):
        return os.path.isfile(os.path.join(spec.root, "TILES"))

    def list_tiles(spec, classnames, class_source):
        n, k = map(int, (root / "TILES").read_text().split())
        return registry.Listing(classnames or [f"tile {i}" for i in range(k)], class_source or "TILES",
                                items=[Item(f"{spec.root}/{i}.png", 0) for i in range(n)], group_names=["all"])

    monkeypatch.setitem(registry.LAYOUTS._items, "tiles", registry.Layout("tiles", list_tiles, detect, 5, False))
    assert sets.detect_format(EvalSetSpec(name="t", root=str(root))) == "tiles"
    p = sets.prepare_set(EvalSetSpec(name="t", root=str(root), subset="1"))
    assert p.format == "tiles" and p.classnames == ["tile 1"] and p.class_map == [[1]]
    assert [it.label for it in p.items] == [0, 0, 0]  # labels index the subset's classes
    assert p.settings["classnames"] == "TILES" and p.group_names == ["all"] and p.num_samples == 3


def test_the_listing_helpers_make_shards_uses_are_public(tmp_path):
    for c in ("b_c", "a"):
        os.makedirs(tmp_path / "tree" / c)
        (tmp_path / "tree" / c / "x.png").write_bytes(b"")
    spec = EvalSetSpec(name="tree", root=str(tmp_path / "tree"))
    classes, samples = sets.list_class_folders(spec, spec.root)
    assert classes == ["a", "b_c"] and [c for _, c in samples] == [0, 1]
    assert sets.folder_classnames(classes) == ["a", "b c"]
    assert sets.folder_labels(spec, ["3", "1"], list("wxyz"), "tree", "names") == [3, 1]
    assert sets.folder_labels(spec, classes, ["B C", "x", "a"], "tree", "names") == [2, 0]  # by name, not position
    with pytest.raises(StarftError, match="1 class folder.* name no class of the 2 class names.*'b_c'"):
        sets.folder_labels(spec, classes, ["a", "x"], "tree", "names")
    (tmp_path / "t.csv").write_text("img,target,domain\na.png,dog,1\nb.png,cat,0\n")
    items, names, group_column = sets.csv_items(EvalSetSpec(name="c", root=str(tmp_path / "t.csv")), str(tmp_path / "t.csv"), None)
    assert names == ["cat", "dog"] and group_column == "domain"
    assert [(os.path.basename(it.ref), it.label, it.group) for it in items] == [("a.png", 1, 1), ("b.png", 0, 0)]


def test_a_shard_pattern_with_missing_shards_is_refused_naming_the_first(tmp_path):
    """An eval set read from part of its shards would score on the rest without a word; the refusal uses the
    same test as --train-data's (``data.checks.missing_local_shards``)."""
    from open_clip_starft.eval.sets.wds import shard_urls
    (tmp_path / "s-0.tar").write_bytes(b"")
    spec = EvalSetSpec(name="v", root=str(tmp_path / "s-{0..1}.tar"))
    with pytest.raises(StarftError, match=r"1 of 2 shards of .*s-\{0\.\.1\}\.tar.* do not exist \(first: .*s-1\.tar"):
        shard_urls(spec, spec.root)
    with pytest.raises(StarftError, match=r"does not exist \(no shard found, first: .*t-0\.tar"):
        shard_urls(spec, str(tmp_path / "t-{0..1}.tar"))
    assert shard_urls(spec, str(tmp_path / "s-{0..0}.tar")) == [str(tmp_path / "s-0.tar")]
    assert shard_urls(spec, "pipe:cat a.tar") == ["pipe:cat a.tar"]  # remote and pipe: sources are not checked
