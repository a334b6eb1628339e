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

import collections
import functools
import logging
import random
from typing import Callable, Sequence

from open_clip_starft.method.descriptors import count_tokens, read_lines_or_json_list, validate_template
from open_clip_starft.errors import ConfigError, DataError
from open_clip_starft.method.registry import Registry

SINGLE_TEMPLATE = "a photo of a {}."

# OpenCLIP's names, templates and tokenizer are imported where they are used, so that importing this module
# (every command line's parser does) does not import open_clip and torch.
CAPTION_TEMPLATE_SETS = ("single", "openai")
"""The built-in caption template sets (``builtin_templates``)."""


@functools.lru_cache(maxsize=None)
def builtin_templates(name: str) -> tuple[str, ...]:
    """A built-in template set: ``single`` ("a photo of a {}.") or ``openai`` (OpenCLIP's 80 ImageNet templates)."""
    if name == "single":
        return (SINGLE_TEMPLATE,)
    from open_clip import OPENAI_IMAGENET_TEMPLATES
    # OpenCLIP keeps its templates as lambdas; rendering each with "{}" gives the format string back.
    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def load_templates(spec: str) -> list[str]:
    """Caption templates: ``single``, ``openai`` (OpenCLIP's 80 ImageNet templates) or a file
    (``.txt`` one per line with ``#`` comments, or a ``.json`` list), each with one ``{}``."""
    if spec in CAPTION_TEMPLATE_SETS:
        return list(builtin_templates(spec))
    located = read_lines_or_json_list(spec, "caption-template file", located=True)
    if not located:
        raise DataError(f"caption-template file {spec!r} has no templates: add one per line, e.g. 'a photo of a {{}}.'")
    return [validate_template(t, where, kind="caption") for t, where in located]


def load_classnames(spec: str) -> list[str]:
    """Class names indexed by class id: ``imagenet`` (OpenCLIP's 1000 names) or a file: one name
    per line (a blank line before the last name is refused, since every later id would shift;
    trailing blank lines are ignored), a JSON list, or a JSON object mapping ids ``0..K-1`` to
    names. Names given more than once in a file are logged as a warning (the zero-shot head
    cannot tell those classes apart)."""
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES
        return list(IMAGENET_CLASSNAMES)
    names = read_lines_or_json_list(spec, "class-names file", comments=False, blank_lines="refuse", id_mapping=True)
    if not names:
        raise DataError(f"class-names file {spec!r} is empty: write one class name per line, in class-id order")
    counts = collections.Counter(names)
    repeated = {name: n for name, n in counts.items() if n > 1}
    if repeated:
        listed = ", ".join(f"{name!r} ×{n} (ids {', '.join(str(i) for i, x in enumerate(names) if x == name)})"
                           for name, n in list(repeated.items())[:5])
        logging.warning(f"class-names file {spec!r} names {len(repeated)} class(es) more than once: {listed}"
                        + (", ..." if len(repeated) > 5 else "")
                        + ": their zero-shot classifiers and captions are identical, so they cannot be told apart")
    return names


def strip_period(caption: str) -> str:
    """The caption without its final period, the stem that descriptor templates wrap."""
    return caption[:-1] if caption.endswith(".") else caption


@functools.lru_cache(maxsize=1)
def vocabulary_words() -> tuple[str, ...]:
    """Whole, alphabetic words (≥ 3 letters) from OpenCLIP's BPE vocabulary, for random suffixes."""
    from open_clip import SimpleTokenizer
    words = (t[:-4] for t in SimpleTokenizer().encoder if t.endswith("</w>"))
    return tuple(sorted({w for w in words if len(w) >= 3 and w.isascii() and w.isalpha()}))


SuffixFn = Callable[[str, random.Random], str]
SUFFIX_MODES: Registry[Callable[..., SuffixFn]] = Registry("suffix mode")
register_suffix_mode = SUFFIX_MODES.register
"""Register a factory ``(descriptors, random_words) -> fn(clean_caption, rng) -> spurious``."""


def list_suffix_modes() -> list[str]:
    return SUFFIX_MODES.names()


@register_suffix_mode("spurious")
def _spurious_suffix(descriptors: Sequence[str], random_words: int) -> SuffixFn:
    if not descriptors:
        raise ConfigError("suffix mode 'spurious' needs descriptors: give a descriptor set (e.g. background)")
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
    return SUFFIX_MODES.get(mode)(descriptors, random_words)


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
            raise ConfigError("no class names: give the ImageNet names (imagenet) or a class-names file")
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.suffix = suffix
        self.descriptors = list(descriptors)
        self._suffix_fn = create_suffix_fn(suffix, descriptors, random_words)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def check_class_id(self, class_id: int, source: str = "") -> int:
        if not 0 <= class_id < len(self.classnames):
            where = f" in {source}" if source else ""
            raise DataError(
                f"class id {class_id}{where} is outside the {len(self.classnames)} class names (0..{len(self.classnames) - 1}): "
                "give a class-names file that names every class id")
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


def warn_long_captions(builder: CaptionBuilder, tokenizer, source: str = "captions") -> int | None:
    """Log a warning when the longest clean or spurious caption ``builder`` can make has more
    tokens than ``tokenizer.context_length`` (the model's text context), where the tokenizer
    silently truncates it (a long descriptor then loses its end, the eot token lands mid-text).

    The longest caption is built from the longest class name (in tokens, with the first
    template), the longest template (with that name) and each descriptor (token counts add up
    word by word, so this finds the longest without rendering every combination). Returns that
    caption's token count, or None when the tokenizer cannot count (``count_tokens``)."""
    context = getattr(tokenizer, "context_length", None)
    if not context or count_tokens(tokenizer, "a") is None:
        return None
    name = max(builder.classnames, key=lambda n: count_tokens(tokenizer, builder.templates[0].replace("{}", n)))
    clean = max((t.replace("{}", name) for t in builder.templates), key=lambda c: count_tokens(tokenizer, c))
    clean_tokens = count_tokens(tokenizer, clean)
    spurious = [(count_tokens(tokenizer, d.replace("{}", strip_period(clean))), d.replace("{}", strip_period(clean)))
                for d in (builder.descriptors if builder.suffix == "spurious" else ())]
    over = [(n, c) for n, c in spurious if n > context]
    shorten = lambda c: repr(c[:100] + ("..." if len(c) > 100 else ""))
    problems = []
    if clean_tokens > context:
        problems.append(f"the longest clean caption has {clean_tokens} tokens ({shorten(clean)})")
    if over:
        n, c = max(over)
        problems.append(f"{len(over)} of {len(spurious)} descriptor templates make spurious captions over it, "
                        f"the longest {n} tokens ({shorten(c)})")
    if problems:
        logging.warning(f"some {source} exceed the model's text context of {context} tokens, where the tokenizer truncates "
                        f"them: {'; '.join(problems)}; shorten the descriptors, caption templates or class names")
    return max([clean_tokens] + [n for n, _ in spurious])


def check_class_prompts(tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse templates whose prompts lose the class name to truncation, before a zero-shot head is built
    from them: the tokenizer cuts every prompt to ``tokenizer.context_length`` tokens, and a template longer
    than that gives every class the same tokens (the head then predicts one class for every image).

    A template that fits with the longest class name (counted by ``count_tokens``) is fine. Any other is
    tokenized with every class name: two classes whose names tokenize apart but whose prompts are the same
    tokens are a one-line DataError naming the template and both classes; prompts that are cut but still
    differ are a warning naming the template. Classes whose names are the same tokens anyway (a repeated
    name) are compared once."""
    import torch
    context = getattr(tokenizer, "context_length", None)
    if not context or len(classnames) < 2:
        return
    _, first = torch.unique(tokenizer(list(classnames)), dim=0, return_inverse=True)
    distinct = [classnames[i] for i in sorted({int(torch.nonzero(first == k)[0]) for k in torch.unique(first)})]
    counts = [count_tokens(tokenizer, n) for n in distinct]
    longest = None if None in counts else max(counts) - 2  # the name's own tokens
    for template in templates:
        base = count_tokens(tokenizer, template.replace("{}", ""))
        if base is not None and longest is not None and base + longest + 1 <= context:
            continue  # even the longest name fits, with a token to spare
        prompts = [template.replace("{}", n) for n in distinct]
        _, inverse = torch.unique(tokenizer(prompts), dim=0, return_inverse=True)
        shown = repr(template if len(template) <= 80 else template[:77] + "...")
        if len(torch.unique(inverse)) < len(distinct):
            a, b = next((i, j) for i in range(len(distinct)) for j in range(i + 1, len(distinct)) if inverse[i] == inverse[j])
            raise DataError(f"caption template {shown} loses the class name to truncation: the prompts of "
                            f"{distinct[a]!r} and {distinct[b]!r} are the same {context} tokens (the template alone has "
                            f"{base if base is not None else 'too many'} tokens; the model's text context is {context}): "
                            "shorten the template so that the class name fits")
        longer = [p for p in prompts if (count_tokens(tokenizer, p) or 0) > context]
        if longer:
            logging.warning(f"caption template {shown}: {len(longer)} of {len(prompts)} class prompts are longer than the "
                            f"model's text context of {context} tokens and are cut (e.g. {longer[0][:100]!r}); their "
                            "class names still differ, but shorten the template")
