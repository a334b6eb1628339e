"""Descriptor sets: the released lists, spec parsing, and one-line errors for bad files."""
import json
from pathlib import Path

import pytest

from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.errors import StarftError

ROOT = Path(__file__).parents[1]
RELEASE = ROOT.parent / "shared/reference/descriptors.json"  # the release's lists, where shared/ is beside the repo
REFERENCE = json.loads(RELEASE.read_text()) if RELEASE.exists() else None


@pytest.mark.parametrize("concept,count", [("background", 58), ("texture", 54), ("resolution", 20)])
def test_released_counts_and_order(concept, count):
    templates = load_descriptors(concept)
    assert len(templates) == count
    assert all(t.count("{}") == 1 for t in templates)
    if REFERENCE is not None:
        assert templates == REFERENCE[concept]


def test_known_entries_are_verbatim():
    assert load_descriptors("background")[8] == "{} in the mountains."
    assert "blurred {}." in load_descriptors("resolution")
    assert "{} with low visibility" in load_descriptors("resolution")  # no final period in the release


def test_all_is_the_ordered_union_without_duplicates(tmp_path):
    union = load_descriptors("all")
    assert union == load_descriptors("background") + load_descriptors("texture") + load_descriptors("resolution")
    assert len(union) == len(set(union)) == 132
    extra = tmp_path / "extra.txt"
    extra.write_text("# mine\n{} in the mountains.\n\n{} on mars.\n")
    mixed = load_descriptors(f"background,{extra}")
    assert len(mixed) == 59 and mixed[-1] == "{} on mars."
    assert load_descriptors("texture,texture") == load_descriptors("texture")


def test_json_file(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(["{} at night.", "foggy {}."]))
    assert load_descriptors(str(f)) == ["{} at night.", "foggy {}."]


def one_line_error(spec):
    with pytest.raises(StarftError) as e:
        load_descriptors(spec)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_concept():
    msg = one_line_error("weather")
    assert "'weather'" in msg and "background" in msg and "all" in msg


def test_missing_file(tmp_path):
    msg = one_line_error(str(tmp_path / "nope.txt"))
    assert "nope.txt" in msg and "not found" in msg


def test_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("# only a comment\n\n")
    msg = one_line_error(str(f))
    assert "empty.txt" in msg and "no templates" in msg


@pytest.mark.parametrize("line,problem", [("in the mountains.", "no '{}'"), ("{} and {}.", "2 '{}'")])
def test_template_without_or_with_two_placeholders(tmp_path, line, problem):
    f = tmp_path / "bad.txt"
    f.write_text("{} fine.\n" + line + "\n")
    msg = one_line_error(str(f))
    assert problem in msg and "bad.txt:2" in msg and "exactly one" in msg


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("{} am Strand, schön.\n".encode("latin-1"))
    msg = one_line_error(str(f))
    assert "latin1.txt" in msg and "UTF-8" in msg


def test_descriptor_files_are_in_the_built_wheel(wheel_files):
    names = wheel_files  # conftest: the wheel pip builds from this checkout
    for concept in ("background", "texture", "resolution"):
        assert f"open_clip_starft/_descriptors/{concept}.txt" in names


def test_one_template_check_names_the_place():
    from open_clip_starft.method.descriptors import validate_template

    assert validate_template("{} at night.", "x") == "{} at night."
    for bad, problem in (("{} at {0}.", "brace besides"), ("{{}} at night.", "'{{}}'"), ("at night.", "no '{}'")):
        with pytest.raises(StarftError) as e:
            validate_template(bad, "mine.txt:7")
        assert problem in str(e.value) and "mine.txt:7" in str(e.value) and "'{} in the mountains.'" in str(e.value)
    with pytest.raises(StarftError) as e:
        validate_template("a photo of a.", "t.txt:1", kind="caption")
    assert "'a photo of a {}.'" in str(e.value) and "class name" in str(e.value)


def test_one_list_loader(tmp_path):
    from open_clip_starft.method.descriptors import read_lines_or_json_list

    f = tmp_path / "l.txt"
    f.write_bytes("\ufeff# head\r\n a \r\n\r\nb\r\n\r\n".encode())
    assert read_lines_or_json_list(str(f), "list") == ["a", "b"]
    assert read_lines_or_json_list(str(f), "list", located=True) == [("a", f"{f}:2"), ("b", f"{f}:4")]
    with pytest.raises(StarftError, match=f"{f}:3"):
        read_lines_or_json_list(str(f), "list", blank_lines="refuse")
    assert read_lines_or_json_list(str(f), "list", comments=False) == ["# head", "a", "b"]
    j = tmp_path / "l.json"
    j.write_text(json.dumps({"1": "b", "0": "a"}))
    assert read_lines_or_json_list(str(j), "list", id_mapping=True) == ["a", "b"]
    with pytest.raises(StarftError, match="JSON list of strings"):
        read_lines_or_json_list(str(j), "list")
