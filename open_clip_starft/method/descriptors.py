"""Spurious descriptor sets: templates such as ``"{} in the mountains."``.

Each template has exactly one ``{}``, filled with the clean caption minus its final period
("a photo of a dog in the mountains."). The released sets (background 58, texture 54,
resolution 20; paper Appendix C.2) ship as plain text inside the package.
"""
from __future__ import annotations

import json
import os
from importlib import resources

from open_clip_starft.errors import StarftError

CONCEPTS = ("background", "texture", "resolution")
"""The released concept sets, in the release's order (``all`` is their union in this order)."""

_PACKAGE_DATA = "open_clip_starft._descriptors"


def validate_template(template: str, where: str) -> str:
    """Return ``template`` if it has exactly one ``{}``; otherwise raise a one-line StarftError."""
    count = template.count("{}")
    if count != 1:
        problem = "has no '{}'" if count == 0 else f"has {count} '{{}}'"
        raise StarftError(
            f"descriptor template {template!r} ({where}) {problem}: "
            "write exactly one '{}' where the clean caption goes, e.g. '{} in the mountains.'")
    return template


def _read_text(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise StarftError(f"{what} {path!r} not found: check the path (or name a built-in set)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StarftError(
            f"{what} {path!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): "
            "save it as UTF-8") from None


def read_descriptor_file(path: str) -> list[str]:
    """Templates from a ``.txt`` file (one per line, ``#`` comments, blank lines ignored) or a
    ``.json`` file (a list of strings)."""
    text = _read_text(path, "descriptor file")
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise StarftError(f"descriptor file {path!r} is not valid JSON ({e.msg} at line {e.lineno}): "
                              "write a JSON list of template strings") from None
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise StarftError(f"descriptor file {path!r} must hold a JSON list of template strings")
        located = [(t.strip(), f"{path}, item {i}") for i, t in enumerate(items) if t.strip()]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                located.append((line, f"{path}:{lineno}"))
    if not located:
        raise StarftError(f"descriptor file {path!r} has no templates: add one template per line, each with one '{{}}'")
    return [validate_template(t, where) for t, where in located]


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
        raise StarftError("--starft-concepts is empty: name a concept (background, texture, resolution, all) "
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
            raise StarftError(
                f"unknown descriptor concept {part!r}: use {', '.join(CONCEPTS)}, all, "
                "a comma list of these, or a path to a .txt/.json descriptor file")
    return list(dict.fromkeys(templates))
