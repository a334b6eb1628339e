"""README.md and docs/*.md stay true to the code: every command they show in a code block parses with the
command's own parser, README's test command is the one ``.ci/run`` runs, README stays short, and every link
between the pages resolves.

How a command is checked (in-process, no subprocess, nothing trained or written): its ``main(argv)`` runs
with ``argparse.ArgumentParser.parse_args`` wrapped so that a successful parse stops the command right
there (``Parsed``). So the real dispatch picks the subcommand and the real parser reads every flag: an
unknown subcommand, flag, choice or a bad ``type=`` value fails the test with argparse's own message.
``open_clip_starft.main`` gets further: its ``--starft-*`` parser and ``check``, then upstream's
``open_clip_train`` parser, reached through the StarFT hooks as a real run reaches it. A sweep's training
flags after ``--`` are checked the same way. Checks a command makes after parsing (files that exist,
value formats read later) are not run: the docs name paths of the reader's machine.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The studies' records are written by the studies' report code and say which command made them; they are
# regenerated, not edited, so their commands are the code's business (tests/test_demo_run.py and the
# studies' own tests), not this file's.
RECORDS = {"demo.md", "waterbirds-lite.md"}
PAGES = [README] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in RECORDS)
PACKAGES = ("open_clip_starft", "studies")
SEPARATORS = {"&&", "||", ";", "|", "&"}


def code_blocks(text: str) -> list[str]:
    """The Markdown code blocks of ``text``: fenced (```), and indented by 4 spaces after a blank line."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            blocks.append("\n".join(lines[i + 1:j]))
            i = j + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append("\n".join(line[4:] for line in lines[i:j]))
            i = j
        else:
            i += 1
    return blocks


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell code block, as word lists (continued lines joined; split at
    ``&&``, ``;``, pipes)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        for word in [*lexer, ";"]:
            if word in SEPARATORS:
                if words:
                    commands.append(words)
                words = []
            else:
                words.append(word)
    return commands


def as_entry_point(words: list[str]) -> tuple[str, list[str]] | None:
    """``(module, argv)`` when ``words`` runs one of ours: ``open-clip-starft ...``, ``python -m MODULE ...``
    or ``torchrun ... -m [--] MODULE ...`` with MODULE in this repository; otherwise None."""
    if words[0] == "open-clip-starft":
        return "open_clip_starft.cli", words[1:]
    if words[0] in ("python", "python3", "torchrun") and "-m" in words:
        rest = words[words.index("-m") + 1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        if rest and rest[0].split(".")[0] in PACKAGES:
            return rest[0], rest[1:]
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """Every command of ours in the code blocks of README and docs: ``(page, module, argv)``."""
    found = []
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            for words in shell_commands(block):
                entry = as_entry_point(words)
                if entry:
                    found.append((page.relative_to(ROOT).as_posix(), *entry))
    return found


class Parsed(BaseException):
    """Raised by the wrapped ``parse_args`` after a successful parse (a BaseException, so no command's
    error handling catches it)."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def entry_main(module: str):
    """The ``main`` that ``python -m module`` runs (a package's: its ``__main__``'s, i.e. its ``cli``'s)."""
    mod = importlib.import_module(module)
    if hasattr(mod, "main"):
        return mod.main
    return importlib.import_module(module + ".cli").main


class Refused(AssertionError):
    """A documented command that its own parser (or check) refuses."""


def parse_command(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run ``module``'s ``main(argv)`` up to its parser's successful parse; raise ``Refused`` with what it
    printed if it refuses the command line instead."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    command = f"{module} {shlex.join(argv)}"
    err = io.StringIO()
    with monkeypatch.context() as m, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            status = entry_main(module)(list(argv))
        except Parsed as parsed:
            namespace = parsed.namespace
        except SystemExit as e:
            raise Refused(f"{command}: exit {e.code}: {err.getvalue().strip()[-400:]}") from None
        else:
            raise Refused(f"{command}: returned {status} before parsing: {err.getvalue().strip()[-400:]}")
        train_args = getattr(namespace, "train_args", None)
        if module == "open_clip_starft.cli" and argv[:1] == ["sweep"] and train_args is not None:
            from open_clip_starft.errors import StarftError
            from open_clip_starft.tools.sweep import train_epochs
            train_args = train_args[1:] if train_args[:1] == ["--"] else train_args
            try:
                train_epochs(train_args)  # refuses the flags the sweep sets itself
            except (SystemExit, StarftError) as e:
                raise Refused(f"{command}: {e} {err.getvalue().strip()[-400:]}") from None
    if module == "open_clip_starft.cli" and argv[:1] == ["sweep"] and train_args is not None:
        parse_command("open_clip_starft.main", train_args, monkeypatch)
    return namespace


COMMANDS = documented_commands()


def test_the_docs_show_the_commands_they_should():
    """The extraction finds what it must (so the parse test below cannot pass by finding nothing)."""
    shown = {(page, module, argv[0] if argv else "") for page, module, argv in COMMANDS}
    for expected in [("README.md", "open_clip_starft.cli", "demo"),
                     ("README.md", "open_clip_starft.main", "--starft-lambda"),
                     ("docs/training.md", "open_clip_starft.main", "--starft-lambda"),
                     ("docs/evaluation.md", "open_clip_starft.cli", "eval"),
                     ("docs/evaluation.md", "open_clip_starft.cli", "sweep"),
                     ("docs/studies.md", "studies.demo_study", "--seeds"),
                     ("docs/studies.md", "studies.waterbirds_lite", "all"),
                     ("docs/recipes.md", "open_clip_starft.cli", "make-shards")]:
        assert expected in shown, f"{expected} not found among {sorted(shown)}"
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("page,module,argv", COMMANDS,
                         ids=[f"{page}:{module}:{' '.join(argv[:2])}" for page, module, argv in COMMANDS])
def test_documented_command_parses(page, module, argv, monkeypatch):
    parse_command(module, argv, monkeypatch)


@pytest.mark.parametrize("module,argv", [
    ("open_clip_starft.cli", ["evaluate", "--model", "RN50"]),  # no such subcommand
    ("open_clip_starft.cli", ["eval", "--bogus"]),  # no such flag
    ("open_clip_starft.cli", ["eval", "--precision", "fp8"]),  # not a choice
    ("open_clip_starft.cli", ["bench", "step", "--batch-size", "eight"]),  # not an int
    ("open_clip_starft.cli", ["descriptors", "generate", "--endpoint"]),  # value missing
    ("open_clip_starft.main", ["--starft-lambda", "-1"]),  # refused by StarFT's check
    ("open_clip_starft.main", ["--starft-lambda", "0.5", "--lr", "fast"]),  # refused by upstream's parser
    ("open_clip_starft.cli", ["sweep", "--out", "o", "--model", "m", "--classnames", "c", "--val", "v", "--",
                              "--epochs", "two"]),  # a training flag after '--' that upstream refuses
    ("studies.waterbirds_lite", ["all", "--scale", "huge"]),
])
def test_a_wrong_command_fails_the_check(module, argv, monkeypatch):
    """The mechanism fails on what a drifted doc would show."""
    with pytest.raises(Refused):
        parse_command(module, argv, monkeypatch)


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 150
    assert "TBD" not in readme and "TODO" not in readme
    ci = (ROOT / ".ci" / "run").read_text()
    packages = re.search(r'^DEBIAN_PACKAGES="([^"]+)"', ci, re.M).group(1).split()
    pip_lines = [line.strip() for line in ci.splitlines() if re.match(r"\s*pip install -q (?!--upgrade)", line)]
    installs = [shlex.split(line.replace(" -q", "")) for line in pip_lines]
    assert [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")] == ["python -m pytest -q -n 2"]
    expected = [["apt-get", "install", "-y", *packages], *installs, ["python", "-m", "pytest", "-q", "-n", "2"]]
    blocks = [shell_commands(b) for b in code_blocks(readme) if "pytest" in b]
    assert expected in blocks, f"README's test command should be {expected}; found {blocks}"
    demo = [shell_commands(b) for b in code_blocks(readme) if "open-clip-starft demo" in b]
    assert demo == [[installs[0], ["pip", "install", "-e", "."], ["open-clip-starft", "demo"]]]


def test_links_between_pages_resolve():
    for page in [README, *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_startup_table_quotes_its_record():
    """docs/performance.md's start-up rows are docs/bench/startup.json's medians, every record shown."""
    page = (ROOT / "docs" / "performance.md").read_text()
    for r in json.loads((ROOT / "docs" / "bench" / "startup.json").read_text())["records"]:
        b, a, q = r["before"], r["after"], r["after_over_before"]
        row = (f"| `{r['command']}` | {b['wall_s']['median']:.1f} / {b['cpu_s']['median']:.2f} | "
               f"{a['wall_s']['median']:.2f} / {a['cpu_s']['median']:.3f} | {q['wall']['median']:.3f} |")
        assert row in page, row
