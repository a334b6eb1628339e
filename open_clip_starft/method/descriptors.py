"""Spurious descriptor sets: templates such as ``"{} in the mountains."``.

Each template has exactly one ``{}``, filled with the clean caption minus its final period
("a photo of a dog in the mountains."). The released sets (background 58, texture 54,
resolution 20; paper Appendix C.2) ship as plain text inside the package.
"""
from __future__ import annotations

import json
import os
from importlib import resources

from open_clip_starft.errors import ConfigError, DataError

CONCEPTS = ("background", "texture", "resolution")
"""The released concept sets, in the release's order (``all`` is their union in this order)."""

_PACKAGE_DATA = "open_clip_starft._descriptors"


_TEMPLATE_KINDS = {  # what the one "{}" stands for, and an example, per kind of template
    "descriptor": ("the clean caption", "{} in the mountains."),
    "caption": ("the class name", "a photo of a {}."),
}


def validate_template(template: str, where: str, *, kind: str = "descriptor") -> str:
    """Return ``template`` if it has exactly one ``{}`` and no other brace; otherwise raise a
    one-line DataError naming ``where`` (e.g. ``file.txt:3``). Templates are filled with
    ``str.replace``, not ``str.format``, so ``{{}}`` would render braces around the text: it is
    refused too. ``kind``: ``descriptor`` (``{}`` = the clean caption) or ``caption`` (the class name).
    The one template check: descriptors, caption templates and eval templates all use it."""
    slot, example = _TEMPLATE_KINDS[kind]
    count = template.count("{}")
    rest = template.replace("{}", "", 1)
    if count != 1:
        problem = "has no '{}'" if count == 0 else f"has {count} '{{}}'"
    elif "{" in rest or "}" in rest:
        problem = ("has '{{}}' (templates are not format strings: no escaping)" if "{{" in template or "}}" in template
                   else "has a brace besides its '{}'")
    else:
        return template
    raise DataError(f"{kind} template {template!r} ({where}) {problem}: write exactly one '{{}}' "
                      f"where {slot} goes, e.g. {example!r}")


def _read_text(path: str, what: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); one-line errors."""
    if not os.path.isfile(path):
        raise DataError(f"{what} {path!r} not found: check the path (or name a built-in set)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} {path!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): "
            "save it as UTF-8") from None


LIST_SUFFIXES = (".txt", ".json")
"""The documented formats of list files: text, one entry per line, and a JSON list."""
_STRUCTURED_SUFFIXES = (".yaml", ".yml", ".jsonl", ".csv", ".tsv", ".toml", ".xml", ".ini", ".md")


def _check_list_format(path: str, what: str, suffixes) -> None:
    """Refuse a file whose name says it is not one of ``suffixes`` (any but structured formats when None)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffixes is not None and suffix not in suffixes or suffix in _STRUCTURED_SUFFIXES:
        raise DataError(f"{what} {path!r} is a {suffix or 'suffix-less'} file, which is not read: write one entry per "
                        "line in a .txt file, or a JSON list of strings in a .json file")


def _check_plain_lines(text: str, entries: list[tuple[str, str]], path: str, what: str) -> None:
    """Refuse a text file that holds YAML or JSON: read one entry per line, ``- 'a {}'`` would be an entry."""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, (list, dict)):
        raise DataError(f"{what} {path!r} holds JSON, but a text file is read one entry per line: name it .json")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    yaml_line = next((where for entry, where in entries if entry == "-" or entry.startswith(("- ", "-\t"))), None)
    if first == "---" or yaml_line is not None:
        raise DataError(f"{what} {path!r} holds YAML ({yaml_line or 'a --- document start'}: a '- ' list item), but a "
                        "text file is read one entry per line: write each entry on its own line without '- ' and "
                        "quotes, or a JSON list in a .json file")


def read_lines_or_json_list(path: str, what: str, *, comments: bool = True, blank_lines: str = "skip",
                            id_mapping: bool = False, located: bool = False, suffixes=None) -> list:
    """The entries of a list file, stripped: a ``.json`` file holding a list of strings, or a
    text file with one entry per line (UTF-8, a BOM dropped, CRLF fine).

    ``comments``: lines starting with ``#`` are skipped. ``blank_lines``: ``"skip"`` drops blank
    lines (and empty JSON items); ``"refuse"`` raises a one-line DataError naming ``file:line``
    for a blank line before the last entry, or the index of an empty JSON item, for lists whose
    positions matter (class names: a dropped line would shift every later id); trailing blank
    lines are always ignored. ``id_mapping``: a JSON object ``{"0": a, "1": b, ...}`` with keys
    exactly ``0..K-1`` is read as the list ``[a, b, ...]``. ``located``: return
    ``[(entry, where)]`` with ``where`` = ``"file:line"`` or ``"file, item i"``. ``suffixes``: the file
    name suffixes accepted (None: any but those of structured formats, YAML, CSV, …); a text file holding
    YAML or JSON is refused, never read line by line. The one loader of "text lines or a JSON list" files
    (descriptors, caption templates, class names, group names)."""
    if blank_lines not in ("skip", "refuse"):
        raise ValueError(f"blank_lines must be 'skip' or 'refuse', not {blank_lines!r}")
    _check_list_format(path, what, suffixes)
    text = _read_text(path, what)
    entries: list[tuple[str, str]] = []
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{what} {path!r} is not valid JSON ({e.msg} at line {e.lineno}): "
                              "write a JSON list of strings" + (" or an object id -> string" if id_mapping else "")) from None
        if id_mapping and isinstance(items, dict):
            try:
                by_id = {int(k): v for k, v in items.items()}
            except ValueError:
                raise DataError(f"{what} {path!r}: JSON object keys must be class ids 0..K-1") from None
            if sorted(by_id) != list(range(len(by_id))):
                raise DataError(f"{what} {path!r}: JSON object keys must be exactly the ids 0..{len(by_id) - 1}")
            items = [by_id[i] for i in range(len(by_id))]
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise DataError(f"{what} {path!r} must hold a JSON list of strings"
                              + (" or an object id -> string" if id_mapping else ""))
        for i, item in enumerate(items):
            if item.strip():
                entries.append((item.strip(), f"{path}, item {i}"))
            elif blank_lines == "refuse":
                raise DataError(f"{what} {path!r} has an empty entry (item {i}): give every position a value "
                                  "(an empty one would shift every later position)")
    else:
        blank = None  # the first blank line not yet followed by an entry
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if comments and line.startswith("#"):
                continue
            if not line:
                blank = blank or lineno
                continue
            if blank is not None and blank_lines == "refuse":
                raise DataError(f"{what} {path}:{blank} is a blank line before more entries: remove it or fill it "
                                  "(dropping it would shift every later position, e.g. class ids)")
            blank = None
            entries.append((line, f"{path}:{lineno}"))
        _check_plain_lines(text, entries, path, what)
    return entries if located else [entry for entry, _ in entries]


def read_descriptor_file(path: str) -> list[str]:
    """Templates from a ``.txt`` file (one per line, ``#`` comments, blank lines ignored) or a
    ``.json`` file (a list of strings), each checked by ``validate_template``; any other suffix, and
    a text file holding YAML or JSON, is a one-line DataError."""
    located = read_lines_or_json_list(path, "descriptor file", located=True, suffixes=LIST_SUFFIXES)
    if not located:
        raise DataError(f"descriptor file {path!r} has no templates: add one template per line, each with one '{{}}'")
    return [validate_template(t, where) for t, where in located]


def count_tokens(tokenizer, text: str) -> int | None:
    """Tokens of ``text`` with the start and end tokens, before any truncation, for OpenCLIP's
    ``SimpleTokenizer`` (CLIP BPE) and ``HFTokenizer``; None for a tokenizer it cannot count with."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # SimpleTokenizer
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)
    if callable(inner):  # HFTokenizer: the HF tokenizer adds its own special tokens
        return len(inner(text)["input_ids"])
    return None


def _builtin(concept: str) -> list[str]:
    ref = resources.files(_PACKAGE_DATA).joinpath(f"{concept}.txt")
    with resources.as_file(ref) as path:
        return read_descriptor_file(str(path))


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".txt", ".json")) or os.sep in spec or os.path.isfile(spec)


def load_descriptors(spec: str) -> list[str]:
    """Descriptor templates for ``spec``.

    ``spec`` is a concept name (``background``, ``texture``, ``resolution``), a comma list of
    them (``"background,texture"``), ``"all"`` (their union), or a path to a ``.txt``/``.json``
    file; comma lists may mix names and paths. The result keeps the order of first appearance
    and drops duplicates.
    """
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ConfigError("the descriptor set is empty: name a concept (background, texture, resolution, all) "
                          "or a descriptor file")
    templates: list[str] = []
    for part in parts:
        if part == "all":
            for concept in CONCEPTS:
                templates.extend(_builtin(concept))
        elif part in CONCEPTS:
            templates.extend(_builtin(part))
        elif _looks_like_path(part):
            templates.extend(read_descriptor_file(part))
        else:
            raise ConfigError(
                f"unknown descriptor concept {part!r}: use {', '.join(CONCEPTS)}, all, "
                "a comma list of these, or a path to a .txt/.json descriptor file")
    return list(dict.fromkeys(templates))
