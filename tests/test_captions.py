"""Clean and spurious captions, class names and templates, and their one-line errors."""
import json
import random

import pytest

from open_clip_starft.method.captions import CaptionBuilder, load_classnames, load_templates, vocabulary_words
from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.errors import StarftError


def test_spurious_caption_wraps_the_clean_caption_without_its_period():
    builder = CaptionBuilder(["dog", "cat"], suffix="spurious", descriptors=["{} in the mountains.", "blurred {}."])
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        clean, spurious = builder(0, rng)
        assert clean == "a photo of a dog."
        assert spurious in {"a photo of a dog in the mountains.", "blurred a photo of a dog."}
        seen.add(spurious)
    assert len(seen) == 2  # drawn per sample


def test_descriptors_are_drawn_uniformly():
    templates = load_descriptors("background")
    builder = CaptionBuilder(["dog"], descriptors=templates)
    rng = random.Random(1)
    counts = {}
    n = 58 * 200
    for _ in range(n):
        s = builder.spurious("a photo of a dog.", rng)
        counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 58
    assert max(counts.values()) < 1.5 * n / 58 and min(counts.values()) > 0.5 * n / 58


def test_same_seed_same_captions_other_seed_other_captions():
    builder = CaptionBuilder(load_classnames("imagenet"), load_templates("openai"), descriptors=load_descriptors("all"))
    run = lambda seed: [builder(c, r) for r in [random.Random(seed)] for c in range(0, 1000, 7)]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_random_suffix_appends_vocabulary_words():
    builder = CaptionBuilder(["goldfish"], suffix="random", random_words=3)
    clean, spurious = builder(0, random.Random(2))
    assert spurious.startswith("a photo of a goldfish ") and spurious.endswith(".")
    words = spurious[len("a photo of a goldfish "):-1].split()
    vocab = set(vocabulary_words())
    assert len(words) == 3 and all(w in vocab for w in words)
    assert len(vocab) > 10000


def test_none_suffix_is_the_clean_caption():
    builder = CaptionBuilder(["goldfish"], suffix="none")
    clean, spurious = builder(0, random.Random(0))
    assert clean == spurious == "a photo of a goldfish."


def test_template_sets():
    assert load_templates("single") == ["a photo of a {}."]
    openai = load_templates("openai")
    assert len(openai) == 80 and openai[0] == "a bad photo of a {}." and all(t.count("{}") == 1 for t in openai)


def test_classnames_from_files(tmp_path):
    assert len(load_classnames("imagenet")) == 1000 and load_classnames("imagenet")[1] == "goldfish"
    (tmp_path / "a.txt").write_text("cat\ndog\n\n")
    (tmp_path / "b.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "c.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    for name in ("a.txt", "b.json", "c.json"):
        assert load_classnames(str(tmp_path / name)) == ["cat", "dog"]


def one_line(fn, *args):
    with pytest.raises(StarftError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_class_id_out_of_range():
    builder = CaptionBuilder(["cat", "dog"], suffix="none")
    msg = one_line(builder, 2, random.Random(0))
    assert "class id 2" in msg and "0..1" in msg and "class-names file" in msg
    assert "--starft" not in msg  # the library names the value and the fix; the command adds its flag


def test_empty_and_missing_classnames_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    msg = one_line(load_classnames, str(tmp_path / "empty.txt"))
    assert "empty.txt" in msg and "empty" in msg
    msg = one_line(load_classnames, str(tmp_path / "missing.txt"))
    assert "missing.txt" in msg and "not found" in msg
    (tmp_path / "gap.json").write_text(json.dumps({"0": "cat", "2": "dog"}))
    assert "0..1" in one_line(load_classnames, str(tmp_path / "gap.json"))


def test_bad_template_file_and_unknown_suffix(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {}.\na picture.\n")
    assert "exactly one" in one_line(load_templates, str(tmp_path / "t.txt"))
    assert "unknown suffix mode 'tokens': use one of spurious, random, none" in one_line(
        CaptionBuilder, ["cat"], ["a {}."], "tokens")


def test_blank_line_inside_classnames_is_refused_with_file_and_line(tmp_path):
    # issue 13 case 4: 'circle,<blank>,square' silently made id 1 = square
    f = tmp_path / "names.txt"
    f.write_text("circle\n\nsquare\n")
    msg = one_line(load_classnames, str(f))
    assert f"{f}:2" in msg and "blank" in msg and "shift" in msg
    f.write_text("\ncircle\nsquare\n")  # a leading blank line shifts every id as well
    assert f"{f}:1" in one_line(load_classnames, str(f))
    f.write_text("circle\nsquare\n\n\n")  # trailing blank lines stay ignored
    assert load_classnames(str(f)) == ["circle", "square"]
    f.write_text("circle\r\n  square  \r\n")
    assert load_classnames(str(f)) == ["circle", "square"]
    j = tmp_path / "names.json"
    j.write_text(json.dumps(["circle", " ", "square"]))
    assert "item 1" in one_line(load_classnames, str(j))


def test_duplicated_classnames_warn_naming_them(tmp_path, caplog):
    f = tmp_path / "names.txt"
    f.write_text("dog\ncat\ndog\ndog\ndog\n")
    with caplog.at_level("WARNING"):
        assert load_classnames(str(f)) == ["dog", "cat", "dog", "dog", "dog"]
    (record,) = [r for r in caplog.records if "more than once" in r.getMessage()]
    assert "'dog' ×4" in record.getMessage() and "ids 0, 2, 3, 4" in record.getMessage() and "names.txt" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_classnames("imagenet")
    assert not caplog.records  # the built-in list is known as it is


def test_template_errors_show_a_real_example(tmp_path):
    (tmp_path / "t.txt").write_text("a picture.\n")
    msg = one_line(load_templates, str(tmp_path / "t.txt"))
    assert "'a photo of a {}.'" in msg and "{{}}" not in msg and "t.txt:1" in msg
    (tmp_path / "e.txt").write_text("# nothing\n")
    assert "'a photo of a {}.'" in one_line(load_templates, str(tmp_path / "e.txt"))


def test_escaped_braces_are_refused_not_rendered(tmp_path):
    # '{{}}' rendered '{a photo of a dog} in the mountains.'
    (tmp_path / "t.txt").write_text("a photo of a {{}}.\n")
    assert "'{{}}'" in one_line(load_templates, str(tmp_path / "t.txt"))
    d = tmp_path / "d.txt"
    d.write_text("{{}} in the mountains.\n")
    msg = one_line(load_descriptors, str(d))
    assert "d.txt:1" in msg and "'{{}}'" in msg and "not format strings" in msg


def test_bom_before_a_comment_line_is_dropped(tmp_path):
    d = tmp_path / "d.txt"
    d.write_bytes("# my descriptors\n{} at night.\n".encode("utf-8-sig"))
    assert load_descriptors(str(d)) == ["{} at night."]
    c = tmp_path / "c.txt"
    c.write_bytes("cat\ndog\n".encode("utf-8-sig"))
    assert load_classnames(str(c)) == ["cat", "dog"]


def test_caption_longer_than_the_text_context_warns(caplog):
    from open_clip import get_tokenizer

    from open_clip_starft.method.captions import warn_long_captions

    tokenizer = get_tokenizer("ViT-B-32")
    long = "{} " + "on a very long road " * 60 + "."
    builder = CaptionBuilder(["cat", "dog"], descriptors=["{} at night.", long])
    with caplog.at_level("WARNING"):
        tokens = warn_long_captions(builder, tokenizer, "training captions")
    assert tokens > 300
    (record,) = caplog.records
    assert "text context of 77 tokens" in record.getMessage() and "1 of 2 descriptor templates" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert warn_long_captions(CaptionBuilder(["cat"], descriptors=["{} at night."]), tokenizer) < 77
    assert not caplog.records
