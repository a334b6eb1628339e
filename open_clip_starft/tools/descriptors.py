"""``open-clip-starft descriptors``: make and inspect spurious descriptor sets.

- ``generate``: ask a language model behind any OpenAI-compatible chat-completions endpoint for
  spurious concepts and, per concept, for descriptors (paper Section 3.2), and write them as a
  descriptor file (``{}`` templates with a provenance header);
- ``show``: print each template rendered for a class name;
- ``validate``: check that descriptor specs load;
- ``stats``: counts, near-duplicates and the longest spurious caption in tokens.

Only the standard library talks HTTP. The API key is read from an environment variable, sent as
``Authorization: Bearer ...`` and never printed or written anywhere.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

from open_clip_starft.method.captions import load_classnames, strip_period
from open_clip_starft.method.descriptors import CONCEPTS, load_descriptors, read_descriptor_file, validate_template
from open_clip_starft.errors import StarftError, one_line_errors

CONCEPTS_PROMPT = ("List possible spurious correlations while classifying natural images. Answer in a word. "
                   "Give {n} different answers, one per line.")
"""Stage one: the paper's prompt, plus the number of answers wanted."""

DESCRIPTORS_PROMPT = (
    "For the spurious concept \"{concept}\", list {n} short descriptors that can be added to an image caption "
    "such as \"a photo of a dog\" without changing the object: either a phrase appended after the caption "
    "(e.g. \"in the mountains\", \"on the beach\") or a word placed before the object (e.g. \"blurred\"). "
    "Answer with a numbered list, one descriptor per line, without explanations.")
"""Stage two, asked once per concept."""

MAX_RETRY_AFTER = 30.0
"""The longest ``Retry-After`` wait honoured, in seconds."""

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


# ---------------------------------------------------------------------------------------------
# Parsing answers and normalising descriptors
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The chat-completions client
# ---------------------------------------------------------------------------------------------

def chat_url(endpoint: str) -> str:
    """``http://host:8000/v1`` (with or without ``/chat/completions``) -> the full POST URL."""
    url = endpoint.strip().rstrip("/")
    if not re.match(r"https?://[^/]", url):
        raise StarftError(f"--endpoint {endpoint!r} is not an http(s) URL: pass a base URL such as http://127.0.0.1:8000/v1")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(headers) -> float | None:
    """Seconds from a ``Retry-After: <seconds>`` header, capped at MAX_RETRY_AFTER; None if absent."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date: fall back to the backoff


class ChatClient:
    """Sends one-message chat-completions requests, retrying 429, 5xx, resets and time-outs
    with exponential backoff. Every error message has the API key masked."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, temperature: float,
                 timeout: float, retries: int, backoff: float):
        self.url = chat_url(endpoint)
        self.model = model
        self.temperature = temperature
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._api_key = api_key or None

    def redact(self, text: str) -> str:
        """``text`` with the API key masked."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def error(self, message: str) -> StarftError:
        """A StarftError whose message has the API key masked."""
        return StarftError(self.redact(message))

    def _post(self, payload: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def _post_with_retries(self, payload: bytes) -> bytes:
        """The response body; retries transient failures, raises StarftError on the others."""
        last = ""
        for attempt in range(self.retries + 1):
            delay = self.backoff * 2 ** attempt
            try:
                return self._post(payload)
            except urllib.error.HTTPError as e:
                body = _one_line(e.read().decode("utf-8", "replace"))
                e.close()
                if e.code != 429 and e.code < 500:
                    raise self.error(f"{self.url} answered HTTP {e.code} {e.reason}: {body or '(no body)'}: "
                                      "check --endpoint, --model and the API key variable (--api-key-env)") from None
                last = f"HTTP {e.code} {e.reason}"
                retry_after = _retry_after(e.headers)
                delay = delay if retry_after is None else retry_after
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    last = f"timed out after {self.timeout:g} s"
                elif isinstance(e.reason, (ConnectionResetError, ConnectionAbortedError)):
                    last = "connection reset"
                else:
                    raise self.error(f"cannot reach {self.url} ({_one_line(e.reason)}): check that the server "
                                      "is running and that --endpoint is right") from None
            except TimeoutError:
                last = f"timed out after {self.timeout:g} s"
            except (ConnectionResetError, ConnectionAbortedError, http.client.HTTPException):
                last = "connection reset"
            if attempt < self.retries:
                time.sleep(delay)
        raise self.error(f"no answer from {self.url} after {self.retries + 1} attempts (last: {last}): "
                          "check the server, or raise --retries / --timeout")

    def ask(self, prompt: str, what: str) -> str:
        """The model's answer to ``prompt`` (``what`` names it in errors)."""
        payload = json.dumps({"model": self.model, "temperature": self.temperature,
                              "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")
        body = self._post_with_retries(payload)
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self.error(f"the answer from {self.url} for {what} is not JSON "
                              f"({_one_line(body.decode('utf-8', 'replace'), 80)!r}): "
                              "is --endpoint an OpenAI-compatible API base URL such as http://host:8000/v1?") from None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            raise self.error(f"{self.url} returned an error for {what}: {_one_line(data['error'].get('message', ''))}")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self.error(f"the answer from {self.url} for {what} has no choices[0].message.content: "
                              "is --endpoint an OpenAI-compatible chat-completions API?") from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str) or not content.strip():
            raise self.error(f"the model {self.model!r} gave an empty answer for {what}: "
                              "try again, or another --model / --temperature")
        return content


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def ask_concepts(client: ChatClient, n: int) -> list[str]:
    """Stage one: up to ``n`` spurious concept names."""
    answer = client.ask(CONCEPTS_PROMPT.format(n=n), "the concept list")
    concepts = concepts_from_answer(answer)[:n]
    if not concepts:
        raise client.error(f"the answer for the concept list had no usable concept names "
                          f"({_one_line(answer, 80)!r}): try again, or name concepts with --concept")
    return concepts


def ask_descriptors(client: ChatClient, concept: str, n: int) -> list[str]:
    """Stage two: up to ``n`` templates for ``concept``."""
    answer = client.ask(DESCRIPTORS_PROMPT.format(concept=concept, n=n), f"concept {concept!r}")
    templates, rejected = templates_from_answer(answer)
    for template in rejected:
        print(f"open-clip-starft: warning: skipped {template!r} for concept {concept!r} (not exactly one '{{}}')",
              file=sys.stderr)
    if not templates:
        raise client.error(f"the answer for concept {concept!r} had no usable descriptors "
                          f"({_one_line(answer, 80)!r}): try again, or another --model / --temperature")
    return templates[:n]


def _header(client: ChatClient, concepts: list[str], num_concepts: int | None, n: int) -> list[str]:
    """The provenance comment lines of a generated file (``num_concepts`` None: concepts were given)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = ["StarFT descriptors generated by `open-clip-starft descriptors generate`.",
             f"endpoint: {client.url}",
             f"model: {client.model}",
             f"date: {now}",
             f"temperature: {client.temperature:g}",
             "concepts prompt: " + (CONCEPTS_PROMPT.format(n=num_concepts) if num_concepts else "(none: given with --concept)"),
             "descriptors prompt: " + DESCRIPTORS_PROMPT.format(concept="{concept}", n=n),
             "concepts: " + ", ".join(concepts),
             "'{}' is the clean caption without its final period. One template per line; '#' starts a comment."]
    return [f"# {client.redact(line)}" for line in lines]


def write_descriptor_file(path: str, header: list[str], groups: dict[str, list[str]]) -> int:
    """Write ``groups`` (concept -> templates) under ``header``, dropping templates seen in an
    earlier group (case-insensitively); returns the number of templates written."""
    seen, body = set(), []
    for concept, templates in groups.items():
        fresh = [t for t in templates if " ".join(t.lower().split()) not in seen]
        seen.update(" ".join(t.lower().split()) for t in fresh)
        if fresh:
            body += ["", f"# concept: {concept}", *fresh]
    if not seen:
        raise StarftError("no descriptors left to write after removing duplicates")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(header + body) + "\n")
    return len(seen)


def _dry_run(client: ChatClient, args) -> int:
    print(f"would POST to {client.url} (model {client.model!r}, temperature {client.temperature:g}); nothing sent")
    if not args.concept:
        print("\nstage 1 prompt (concepts):")
        print(f"  {CONCEPTS_PROMPT.format(n=args.num_concepts)}")
    concepts = args.concept or ["{concept}"]
    print("\nstage 2 prompt, once per concept" + ("" if args.concept else " named in the stage 1 answer") + ":")
    for concept in concepts:
        print(f"  {DESCRIPTORS_PROMPT.format(concept=concept, n=args.num)}")
    return 0


def cmd_generate(args) -> int:
    """``descriptors generate``."""
    if args.num < 1 or args.num_concepts < 1:
        raise StarftError("--num and --num-concepts must be ≥ 1")
    if args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        raise StarftError("--retries and --backoff must be ≥ 0 and --timeout > 0")
    client = ChatClient(args.endpoint, args.model, os.environ.get(args.api_key_env), args.temperature,
                        args.timeout, args.retries, args.backoff)
    if args.dry_run:
        return _dry_run(client, args)
    if not args.out or args.out.endswith(".json"):
        raise StarftError("descriptors generate needs --out FILE.txt (a text descriptor file), "
                          "or --dry-run to only print the prompts")
    concepts = list(dict.fromkeys(c.strip() for c in args.concept if c.strip())) or ask_concepts(client, args.num_concepts)
    groups = {}
    for concept in concepts:
        groups[concept] = ask_descriptors(client, concept, args.num)
        print(f"  {concept}: {len(groups[concept])} descriptors")
    count = write_descriptor_file(args.out, _header(client, concepts, None if args.concept else args.num_concepts, args.num), groups)
    read_descriptor_file(args.out)  # the file must load as written
    print(f"wrote {count} descriptor templates for {len(concepts)} concepts to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# show, validate, stats
# ---------------------------------------------------------------------------------------------

def _caption_template(template: str) -> str:
    if template.count("{}") != 1:
        raise StarftError(f"--template {template!r} must have exactly one '{{}}' where the class name goes, "
                          "e.g. 'a photo of a {}.'")
    return template


def render(descriptor: str, classname: str, template: str) -> str:
    """The spurious caption of ``descriptor`` for ``classname``: ``"a photo of a dog in the mountains."``."""
    return descriptor.replace("{}", strip_period(template.replace("{}", classname)))


def cmd_show(args) -> int:
    """``descriptors show``."""
    template = _caption_template(args.template)
    for descriptor in load_descriptors(args.spec):
        print(render(descriptor, args.classname, template))
    return 0


def cmd_validate(args) -> int:
    """``descriptors validate``: every spec, one line each; exit 2 if any fails."""
    status = 0
    for spec in args.specs:
        try:
            print(f"OK {spec}: {len(load_descriptors(spec))} descriptor templates")
        except StarftError as e:
            print(f"open-clip-starft: error: {e}", file=sys.stderr)
            status = 2
    return status


def _raw_templates(spec: str) -> list[str]:
    """The templates of ``spec`` before duplicates are dropped (files as written)."""
    raw = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        raw += load_descriptors(part) if part in CONCEPTS or part == "all" else read_descriptor_file(part)
    return raw


def near_duplicates(templates: list[str]) -> list[list[str]]:
    """Groups of templates equal up to case and whitespace, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for template in templates:
        groups.setdefault(" ".join(template.lower().split()), []).append(template)
    return [group for group in groups.values() if len(group) > 1]


def load_tokenizer(model: str):
    """OpenCLIP's tokenizer for ``model``; a clear error for unknown names."""
    import open_clip

    if ":" not in model and open_clip.get_model_config(model) is None:
        raise StarftError(f"unknown --model {model!r}: use an OpenCLIP model name (e.g. ViT-B-32; "
                          "see open_clip.list_models()) or local-dir:/hf-hub: names")
    try:
        return open_clip.get_tokenizer(model)
    except Exception as e:  # downloads, missing files: one line, not a traceback
        raise StarftError(f"cannot load the tokenizer of --model {model!r}: {_one_line(e)}") from None


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` including the start and end tokens, before any truncation."""
    from open_clip import SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        return len(tokenizer.encode(text)) + 2
    return len(tokenizer.tokenizer(text)["input_ids"])  # HF tokenizers add their own special tokens


def cmd_stats(args) -> int:
    """``descriptors stats``."""
    template = _caption_template(args.template)
    descriptors = load_descriptors(args.spec)
    raw = _raw_templates(args.spec)
    print(f"{args.spec}: {len(descriptors)} descriptor templates")
    duplicates = near_duplicates(raw)
    if duplicates:
        print(f"near-duplicates: {len(duplicates)} group(s)")
        for group in duplicates:
            print("  " + " ~ ".join(repr(t) for t in group))
    else:
        print("near-duplicates: none")

    tokenizer = load_tokenizer(args.model)
    context = args.context_length or tokenizer.context_length
    classnames = load_classnames(args.classnames)
    longest_class = max(classnames, key=lambda name: count_tokens(tokenizer, template.replace("{}", name)))
    lengths = [(count_tokens(tokenizer, render(d, longest_class, template)), render(d, longest_class, template))
               for d in descriptors]
    tokens, caption = max(lengths)
    print(f"longest class name ({args.classnames}): {longest_class!r}")
    print(f"longest spurious caption: {tokens} tokens (with start/end) of a context of {context} "
          f"({args.model}): {caption!r}")
    truncated = sum(n > context for n, _ in lengths)
    if truncated:
        print(f"open-clip-starft: warning: {truncated} of {len(lengths)} spurious captions for {longest_class!r} "
              f"exceed the context length {context} and would be truncated", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft descriptors", description="Make and inspect spurious descriptor sets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,show,validate,stats}")

    gen = sub.add_parser("generate", help="ask a language model for concepts and descriptors; write a descriptor file")
    gen.add_argument("--endpoint", required=True, metavar="URL", help="OpenAI-compatible API base URL, e.g. http://127.0.0.1:8000/v1")
    gen.add_argument("--model", required=True, metavar="NAME", help="model name sent to the endpoint")
    gen.add_argument("--out", metavar="FILE", help="descriptor file to write (.txt)")
    gen.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                     help="environment variable holding the API key, sent as a bearer token if set (default OPENAI_API_KEY)")
    gen.add_argument("--concept", action="append", default=[], metavar="NAME",
                     help="a spurious concept (repeatable); skips asking the model for concepts")
    gen.add_argument("--num-concepts", type=int, default=3, metavar="N", help="concepts to ask for when no --concept (default 3)")
    gen.add_argument("--num", type=int, default=20, metavar="N", help="descriptors to ask for per concept (default 20)")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    gen.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    gen.add_argument("--retries", type=int, default=4, help="retries on 429, 5xx, resets and time-outs (default 4)")
    gen.add_argument("--backoff", type=float, default=1.0,
                     help="first retry delay in seconds, doubled each retry; Retry-After wins when sent (default 1)")
    gen.add_argument("--dry-run", action="store_true", help="print the prompts and exit without sending anything")
    gen.set_defaults(handler=cmd_generate)

    show = sub.add_parser("show", help="print each template rendered for a class name")
    show.add_argument("spec", metavar="SPEC", help="descriptor spec: a concept, a comma list, all, or a file")
    show.add_argument("--classname", default="dog", metavar="NAME", help="class name to render (default dog)")
    show.add_argument("--template", default="a photo of a {}.", metavar="TEMPLATE", help="clean caption template (default 'a photo of a {}.')")
    show.set_defaults(handler=cmd_show)

    val = sub.add_parser("validate", help="check that descriptor specs load")
    val.add_argument("specs", nargs="+", metavar="SPEC", help="descriptor specs: concepts, comma lists, files")
    val.set_defaults(handler=cmd_validate)

    stats = sub.add_parser("stats", help="counts, near-duplicates and the longest spurious caption in tokens")
    stats.add_argument("spec", metavar="SPEC", help="descriptor spec: a concept, a comma list, all, or a file")
    stats.add_argument("--model", default="ViT-B-32", metavar="MODEL", help="OpenCLIP model whose tokenizer counts tokens (default ViT-B-32)")
    stats.add_argument("--context-length", type=int, metavar="N", help="context length (default: the tokenizer's)")
    stats.add_argument("--classnames", default="imagenet", metavar="imagenet|FILE", help="imagenet or a class-names file; its longest name is used")
    stats.add_argument("--template", default="a photo of a {}.", metavar="TEMPLATE", help="clean caption template (default 'a photo of a {}.')")
    stats.set_defaults(handler=cmd_stats)
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
