"""Start-up: importing the package, ``open-clip-starft --help`` and every refused command line answer without
importing torch or open_clip (seconds per process on 2 cores; ``docs/bench/startup.json`` has the timings).

Each check runs in a fresh interpreter (``sys.modules`` of this test process already holds torch) and reads
``sys.modules`` afterwards: deterministic, where a timing would depend on the machine's load.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "open_clip_train.main")

PROBE = """
import contextlib, io, json, sys
heavy = {heavy!r}
loaded = lambda: [m for m in heavy if m in sys.modules]
report = {{"import": None, "commands": []}}
import open_clip_starft, open_clip_starft.cli
report["import"] = loaded()
for argv in {cases!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            status = open_clip_starft.cli.main(argv)
        except SystemExit as e:
            status = e.code
    report["commands"].append({{"argv": argv, "status": status, "heavy": loaded(),
                               "said": err.getvalue().strip().splitlines()[-1:]}})
print(json.dumps(report))
"""


def probe(cases: list[list[str]]) -> dict:
    """Import the package and run ``open-clip-starft`` with each argv in turn, in one fresh interpreter; the
    heavy modules loaded after the import and after each command."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, cases=cases)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_and_its_command_loads_no_torch():
    assert probe([])["import"] == []


# (argv, exit status): --help answers 0; a refusal answers 2 in one line
REFUSALS = [
    (["--help"], 0), ([], 2), (["evaluate"], 2), (["demo-study"], 2),
    (["eval", "--help"], 0), (["eval", "--bogus"], 2), (["eval", "--precision", "fp8", "--out", "r.jsonl"], 2),
    (["eval", "--out", "r.jsonl"], 2),  # no eval set: refused after parsing, still before any model code
    (["wise", "--bogus"], 2), (["sweep", "--help"], 0), (["sweep", "--bogus"], 2), (["export", "--bogus"], 2),
    (["demo", "--bogus"], 2), (["make-shards", "--bogus"], 2), (["descriptors", "generate", "--bogus"], 2),
    (["train", "--starft-lambda", "-1"], 2), (["train", "--starft-schedule", "cosine"], 2),
    (["train", "--lr", "fast"], 2), (["train", "--bogus"], 2),  # upstream's own flags, by upstream's parser
    (["bench", "--help"], 0), (["bench", "steps"], 2),
    # not yet: the benchmarks' own flags (bench step|data|eval, eval-bench) are parsed after torch is imported
]


def test_help_and_refusals_load_no_torch():
    report = probe([argv for argv, _ in REFUSALS])
    for (argv, status), result in zip(REFUSALS, report["commands"]):
        assert result["status"] == status, (argv, result)
        assert result["heavy"] == [], f"open-clip-starft {' '.join(argv)} imported {result['heavy']}: {result['said']}"


def test_the_public_names_still_import():
    """The lazy ``__init__`` gives the same objects as their modules, and refuses an unknown name."""
    import open_clip_starft
    from open_clip_starft.method import loss, schedule
    assert open_clip_starft.StarLoss is loss.StarLoss and open_clip_starft.star_lambda is schedule.star_lambda
    for name in open_clip_starft.__all__:
        assert getattr(open_clip_starft, name) is not None and name in dir(open_clip_starft)
    with pytest.raises(AttributeError):
        open_clip_starft.no_such_name  # noqa: B018
