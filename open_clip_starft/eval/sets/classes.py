"""Class names, caption templates and class subsets of eval sets.

A subset restricts the head to some of its class ids (ImageNet-R and -A use 200 of ImageNet's
1000; shipped as ``eval/class_subsets/*.txt``).
"""
from __future__ import annotations

import os
import re
from importlib import resources

from open_clip_starft.errors import StarftError
from open_clip_starft.method.captions import load_classnames, load_templates
from open_clip_starft.method.descriptors import read_lines_or_json_list, validate_template

SUBSETS = ("imagenet-r", "imagenet-a")


def builtin_subset(name: str) -> list[int]:
    """The 200 ImageNet class ids of ``imagenet-r`` or ``imagenet-a`` (shipped as text files)."""
    ref = resources.files("open_clip_starft.eval").joinpath("class_subsets").joinpath(name.replace("-", "_") + ".txt")
    return parse_subset_text(ref.read_text(encoding="utf-8"), name)


def parse_subset_text(text: str, where: str) -> list[int]:
    """Class ids of a subset file: one integer per line (more words after it and ``#`` comments ignored)."""
    ids = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ids.append(int(line.split()[0]))
        except ValueError:
            raise StarftError(f"class subset {where!r}, line {lineno}: {line.split()[0]!r} is not a class id: "
                              "write one integer class id per line") from None
    return ids


def load_subset(spec, num_head_classes: int, where: str = "--subset") -> list[int] | None:
    """Head class ids of a subset spec: a built-in name, a file (one id per line), a list, or
    ``"1,2,3"``. Ids must be unique and within the head's class names."""
    if spec is None or spec == "" or spec == "none":
        return None
    if isinstance(spec, (list, tuple)):
        try:
            ids = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise StarftError(f"{where}: the subset list must hold integer class ids") from None
        source = "the list"
    elif spec in SUBSETS:
        ids, source = builtin_subset(spec), spec
    elif re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", str(spec)):
        ids, source = [int(i) for i in str(spec).split(",")], "the list"
    else:
        if not os.path.isfile(spec):
            raise StarftError(f"{where} {spec!r}: no such file: name imagenet-r, imagenet-a, a file of class ids "
                              "(one per line) or a comma list")
        with open(spec, encoding="utf-8") as f:
            ids, source = parse_subset_text(f.read(), spec), spec
    if not ids:
        raise StarftError(f"{where} {spec!r} is empty: list at least one class id")
    bad = [i for i in ids if not 0 <= i < num_head_classes]
    if bad:
        raise StarftError(f"{where}: class id {bad[0]} of {source} is out of range for the {num_head_classes} "
                          f"class names (0..{num_head_classes - 1}): fix the subset or pass the class names it indexes")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise StarftError(f"{where}: class id {dup} appears twice in {source}: list each class once")
    return ids


def resolve_classnames(spec) -> tuple[list[str], str]:
    """(names, description) for ``imagenet``, a file, or a list."""
    if isinstance(spec, (list, tuple)):
        return [str(n) for n in spec], f"{len(spec)} names"
    return load_classnames(spec), spec


def _template_file(path: str) -> list[str]:
    """A templates file with ``{}`` or CLIP_benchmark's ``{c}`` placeholders, one per line (or a JSON list),
    read by the one list-file reader (YAML and other formats refused)."""
    located = read_lines_or_json_list(path, "templates file", located=True)
    if not located:
        raise StarftError(f"templates file {path!r} has no templates: write one per line with '{{c}}' or '{{}}' "
                          "where the class name goes")
    return [validate_template(t.replace("{c}", "{}"), where, kind="caption") for t, where in located]


def resolve_templates(spec) -> tuple[list[str], str]:
    """(templates, description) for ``single``, ``openai``, a file (``{}`` or CLIP_benchmark's
    ``{c}``), or a list; each template has exactly one ``{}``."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise StarftError("templates: the list is empty: give at least one template with '{}' where the class name goes")
        templates = [validate_template(str(t).replace("{c}", "{}"), "the templates list", kind="caption") for t in spec]
        return templates, f"{len(templates)} templates"
    if spec in ("single", "openai"):
        return load_templates(spec), spec
    if not os.path.isfile(str(spec)):
        raise StarftError(f"--templates {spec!r}: use single, openai or a file of templates (one per line)")
    try:
        return load_templates(spec), spec
    except StarftError:
        return _template_file(spec), spec  # CLIP_benchmark's {c} placeholders
