"""Clean and spurious captions for a class id.

Clean caption: a caption template filled with the class name (``"a photo of a dog."``; FLYP
style). Spurious caption: made from the clean caption by a *suffix mode* chosen by name:

- ``spurious``: a descriptor template drawn uniformly per sample, filled with the clean caption
  minus its final period ("a photo of a dog in the mountains.");
- ``random``: a few random words from the CLIP tokenizer's vocabulary appended (the paper's
  random-token ablation, Table 6);
- ``none``: the clean caption itself (the paper's "regularise clean captions" ablation).

Randomness comes from a ``random.Random`` that the caller seeds (one per data-loader worker), so
captions are reproducible.
"""
from __future__ import annotations

import functools
import json
import random
from typing import Callable, Sequence

from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SimpleTokenizer

from open_clip_starft.method.descriptors import _read_text
from open_clip_starft.errors import StarftError

SINGLE_TEMPLATE = "a photo of a {}."

# OpenCLIP keeps its templates as lambdas; rendering each with "{}" gives the format string back.
CAPTION_TEMPLATE_SETS = {
    "single": (SINGLE_TEMPLATE,),
    "openai": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
}


def load_templates(spec: str) -> list[str]:
    """Caption templates: ``single``, ``openai`` (OpenCLIP's 80 ImageNet templates) or a file
    (``.txt`` one per line with ``#`` comments, or a ``.json`` list), each with one ``{}``."""
    if spec in CAPTION_TEMPLATE_SETS:
        return list(CAPTION_TEMPLATE_SETS[spec])
    text = _read_text(spec, "caption-template file")
    if spec.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise StarftError(f"caption-template file {spec!r} is not valid JSON ({e.msg}): "
                              "write a JSON list of templates") from None
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise StarftError(f"caption-template file {spec!r} must hold a JSON list of template strings")
    else:
        items = [line for line in text.splitlines() if not line.strip().startswith("#")]
    templates = [t.strip() for t in items if t.strip()]
    if not templates:
        raise StarftError(f"caption-template file {spec!r} has no templates: add one per line, e.g. 'a photo of a {{}}.'")
    for t in templates:
        if t.count("{}") != 1:
            raise StarftError(f"caption template {t!r} in {spec!r} must have exactly one '{{}}' "
                              "where the class name goes, e.g. 'a photo of a {{}}.'")
    return templates


def load_classnames(spec: str) -> list[str]:
    """Class names indexed by class id: ``imagenet`` (OpenCLIP's 1000 names) or a file: one name
    per line, a JSON list, or a JSON object mapping ids ``0..K-1`` to names."""
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    text = _read_text(spec, "class-names file")
    if spec.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise StarftError(f"class-names file {spec!r} is not valid JSON ({e.msg}): "
                              "write a JSON list of names or an object id -> name") from None
        if isinstance(items, dict):
            try:
                by_id = {int(k): v for k, v in items.items()}
            except ValueError:
                raise StarftError(f"class-names file {spec!r}: JSON object keys must be class ids 0..K-1") from None
            if sorted(by_id) != list(range(len(by_id))):
                raise StarftError(f"class-names file {spec!r}: JSON object keys must be exactly the ids 0..{len(by_id) - 1}")
            items = [by_id[i] for i in range(len(by_id))]
        if not isinstance(items, list) or not all(isinstance(n, str) for n in items):
            raise StarftError(f"class-names file {spec!r} must hold a JSON list of names or an object id -> name")
        names = [n.strip() for n in items]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise StarftError(f"class-names file {spec!r} is empty: write one class name per line, in class-id order")
    if any(not n for n in names):
        raise StarftError(f"class-names file {spec!r} has an empty class name: give every class id a name")
    return names


def strip_period(caption: str) -> str:
    """The caption without its final period, the stem that descriptor templates wrap."""
    return caption[:-1] if caption.endswith(".") else caption


@functools.lru_cache(maxsize=1)
def vocabulary_words() -> tuple[str, ...]:
    """Whole, alphabetic words (≥ 3 letters) from OpenCLIP's BPE vocabulary, for random suffixes."""
    words = (t[:-4] for t in SimpleTokenizer().encoder if t.endswith("</w>"))
    return tuple(sorted({w for w in words if len(w) >= 3 and w.isascii() and w.isalpha()}))


SuffixFn = Callable[[str, random.Random], str]
_SUFFIX_MODES: dict[str, Callable[..., SuffixFn]] = {}


def register_suffix_mode(name: str):
    """Register a factory ``(descriptors, random_words) -> fn(clean_caption, rng) -> spurious``."""
    def deco(factory):
        _SUFFIX_MODES[name] = factory
        return factory
    return deco


def list_suffix_modes() -> list[str]:
    return list(_SUFFIX_MODES)


@register_suffix_mode("spurious")
def _spurious_suffix(descriptors: Sequence[str], random_words: int) -> SuffixFn:
    if not descriptors:
        raise StarftError("suffix mode 'spurious' needs descriptors: pass --starft-concepts")
    templates = tuple(descriptors)
    return lambda clean, rng: rng.choice(templates).replace("{}", strip_period(clean))


@register_suffix_mode("random")
def _random_suffix(descriptors: Sequence[str], random_words: int) -> SuffixFn:
    words = vocabulary_words()
    return lambda clean, rng: " ".join([strip_period(clean), *rng.choices(words, k=random_words)]) + "."


@register_suffix_mode("none")
def _no_suffix(descriptors: Sequence[str], random_words: int) -> SuffixFn:
    return lambda clean, rng: clean


def create_suffix_fn(mode: str, descriptors: Sequence[str] = (), random_words: int = 3) -> SuffixFn:
    if mode not in _SUFFIX_MODES:
        raise StarftError(f"unknown --starft-suffix {mode!r}: use one of {', '.join(_SUFFIX_MODES)}")
    return _SUFFIX_MODES[mode](descriptors, random_words)


class CaptionBuilder:
    """Makes ``(clean, spurious)`` caption pairs for class ids.

    Args:
        classnames: name of each class id, ``K`` entries.
        templates: clean caption templates, each with one ``{}``; one is drawn per sample.
        suffix: suffix mode name (``spurious``, ``random``, ``none``).
        descriptors: descriptor templates for ``spurious`` mode.
        random_words: words appended in ``random`` mode.
    """

    def __init__(self, classnames: Sequence[str], templates: Sequence[str] = (SINGLE_TEMPLATE,),
                 suffix: str = "spurious", descriptors: Sequence[str] = (), random_words: int = 3):
        if not classnames:
            raise StarftError("no class names: pass --starft-classnames imagenet or a class-names file")
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.suffix = suffix
        self._suffix_fn = create_suffix_fn(suffix, descriptors, random_words)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def check_class_id(self, class_id: int, source: str = "") -> int:
        if not 0 <= class_id < len(self.classnames):
            where = f" in {source}" if source else ""
            raise StarftError(
                f"class id {class_id}{where} is outside the {len(self.classnames)} class names (0..{len(self.classnames) - 1}): "
                "pass --starft-classnames with a file that names every class id")
        return class_id

    def clean(self, class_id: int, rng: random.Random) -> str:
        self.check_class_id(class_id)
        template = self.templates[0] if len(self.templates) == 1 else rng.choice(self.templates)
        return template.replace("{}", self.classnames[class_id])

    def spurious(self, clean: str, rng: random.Random) -> str:
        return self._suffix_fn(clean, rng)

    def __call__(self, class_id: int, rng: random.Random) -> tuple[str, str]:
        clean = self.clean(class_id, rng)
        return clean, self.spurious(clean, rng)
