"""Reading a language model's answers: list items out of free text, JSON or markdown, cleaned into
descriptor phrases and turned into ``{}`` templates (``in the mountains`` -> ``{} in the mountains.``).

Pure functions of strings; no I/O.
"""
from __future__ import annotations

import json
import re

from open_clip_starft.errors import StarftError
from open_clip_starft.method.descriptors import validate_template

MAX_ITEM_WORDS = 12
"""Answer lines longer than this are taken for prose, not descriptors."""

PREPOSITIONS = frozenset("""
    in on at with without under near during by beside behind among amid amidst against over above below
    beneath underneath inside outside through throughout across along around between from into onto within
    next after before atop as like of via
""".split())
"""First words of phrases that follow the caption: ``{} in the mountains.``"""

IRREGULAR_PARTICIPLES = frozenset("lit seen taken shot set held worn hidden drawn made caught found".split())

_PROSE_STARTS = ("here ", "here's", "here is", "sure", "certainly", "okay", "ok,", "ok.", "note", "below",
                 "these ", "the following", "i ", "i'm", "i've", "i’m", "i’ve", "hope", "let me", "feel free",
                 "as an ai")
_MARKER = re.compile(r"^\s*(?:[-*+•·‣◦–—]\s+|\(?\d{1,3}[.):](?!\d)\s*|\[\d{1,3}\]\s*)")
_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)```", re.S)
_PLACEHOLDER = re.compile(r"\{\s*(?:caption|class|classname|class name|object)?\s*\}|\[(?:caption|class|object)\]"
                          r"|<(?:caption|class|object)>", re.I)
_QUOTES = "\"'“”‘’«»`"



def _strings_in(value) -> list[str] | None:
    """The strings of a JSON answer: a list of strings (or of one-field objects), or an object
    holding such a list; None when ``value`` is not shaped like that."""
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        return _strings_in(lists[0]) if len(lists) == 1 else None
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if isinstance(item, dict):
            item = next((v for v in item.values() if isinstance(v, str)), None)
        if isinstance(item, str):
            out.append(item)
    return out or None


def _json_items(text: str) -> list[str] | None:
    """Items of a JSON list in ``text`` (bare, inside a code fence, or amid prose), else None."""
    candidates = [block.strip() for block in _FENCE.findall(text)] + [text.strip()]
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            items = _strings_in(json.loads(candidate))
        except ValueError:
            continue
        if items is not None:
            return items
    return None


def _looks_like_prose(line: str) -> bool:
    """Intros, headings and sentences around the list, not items."""
    lower = line.lower()
    return (line.endswith((":", "!", "?")) or line.startswith("#") or len(line.split()) > MAX_ITEM_WORDS
            or lower.startswith(_PROSE_STARTS))


def parse_items(text: str) -> list[str]:
    """The raw items of a model's answer, in order.

    Understands a JSON list (also inside a ```json fence), numbered (``1.``, ``1)``) and bulleted
    (``-``, ``*``, ``•``) lists, comma-separated lines and one item per line. When some lines
    carry list markers, only those count; lines that look like prose are dropped.
    """
    items = _json_items(text)
    if items is not None:
        return [item for item in items if item.strip()]
    lines = [line.strip() for line in _FENCE.sub(lambda m: m.group(1), text).splitlines()]
    lines = [line for line in lines if line and not line.startswith("```")]
    marked = [_MARKER.sub("", line, count=1) for line in lines if _MARKER.match(line)]
    if marked:
        return [item for item in marked if item and not _looks_like_prose(item)]
    items = []
    for line in lines:
        if _looks_like_prose(line):
            continue
        parts = (re.sub(r"^\s*(?:and|or)\s+", "", part) for part in re.split(r"[,;]", line))  # "a, b, and c"
        items.extend(part for part in parts if part.strip())
    return items


def _head(item: str) -> str:
    """``"Background: the setting ..."`` -> ``"Background"``: drop an explanation after the item."""
    parts = re.split(r"\s*:\s+|\s+[-–—]\s+", item, maxsplit=1)
    return parts[0] if len(parts) == 2 and parts[0] and len(parts[0].split()) <= 6 else item


def _lower_first(text: str) -> str:
    """Lowercase the first letter unless the first word is an acronym (``HDR``, ``JPEG``)."""
    first = text.split()[0] if text.split() else ""
    if len(first) > 1 and first[:2].isupper():
        return text
    return text[:1].lower() + text[1:]


def clean_item(item: str) -> str:
    """One answer item without markdown, numbering, explanations, quotes or trailing punctuation
    (a ``{}`` template keeps its punctuation), first letter lowercased unless an acronym."""
    text = re.sub(r"\*\*|__", "", item).strip()
    text = _MARKER.sub("", text, count=1).strip()
    text = _head(text)
    text = re.sub(r"\s*\([^()]*\)$", "", text.strip())  # "(common in photos)"
    text = text.strip().strip(_QUOTES).strip()
    text = _PLACEHOLDER.sub("{}", text)
    if "{}" not in text:
        text = text.rstrip(".,;:!? ").strip(_QUOTES).strip()
    if not re.search(r"[^\W\d_]", text):  # no letters: "[]", "---", "{}"
        return ""
    return _lower_first(" ".join(text.split()))


def _is_participle(word: str) -> bool:
    return word in IRREGULAR_PARTICIPLES or (len(word) > 4 and word.endswith(("ed", "ing")))


def to_template(phrase: str) -> str:
    """A cleaned descriptor as a ``{}`` template.

    ``{} in the mountains.`` stays; ``in the mountains`` / ``surrounded by flowers`` (a
    preposition, or a participle and a preposition) -> ``{} <phrase>.``; ``blurred``,
    ``partially occluded``, ``black and white`` -> ``<phrase> {}.``; other phrases
    (``rough texture``) -> ``{} with <phrase>.``.
    """
    if "{}" in phrase:
        return phrase
    words = phrase.lower().split()
    if words[0] in PREPOSITIONS or (len(words) > 1 and _is_participle(words[0]) and words[1] in PREPOSITIONS):
        return f"{{}} {phrase}."
    if len(words) == 1 or words[0].endswith("ly") or (len(words) == 3 and words[1] in ("and", "or")):
        return f"{phrase} {{}}."
    return f"{{}} with {phrase}."


def templates_from_answer(answer: str) -> tuple[list[str], list[str]]:
    """``(templates, rejected)`` from a stage-two answer: cleaned, normalised, validated and
    deduplicated case-insensitively; ``rejected`` holds the items that failed validation."""
    templates, rejected, seen = [], [], set()
    for item in parse_items(answer):
        phrase = clean_item(item)
        if not phrase:
            continue
        template = to_template(phrase)
        try:
            validate_template(template, "model answer")
        except StarftError:
            rejected.append(template)
            continue
        key = " ".join(template.lower().split())
        if key not in seen:
            seen.add(key)
            templates.append(template)
    return templates, rejected


def concepts_from_answer(answer: str) -> list[str]:
    """Concept names from a stage-one answer, cleaned and deduplicated case-insensitively."""
    names: dict[str, str] = {}
    for item in parse_items(answer):
        name = clean_item(item)
        if name and "{}" not in name and "#" not in name:
            names.setdefault(name.lower(), name)
    return list(names.values())
