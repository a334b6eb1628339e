"""``open-clip-starft bench step|data|eval``: the speed benchmarks, one module each.

- ``step``: one training step, FLYP vs StarFT vs a naive port (time, FLOPs, peak memory);
- ``data``: our training data pipeline vs upstream's ``get_wds_dataset`` (samples/s);
- ``eval``: eval throughput and zero-shot head cost per model (also ``open-clip-starft eval-bench``).

``bench waterbirds-lite`` is kept as an alias of ``open-clip-starft waterbirds-lite``, the accuracy study.
Every subcommand has its own ``--help``; none writes a file unless given ``--out`` (``--json`` for eval).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from open_clip_starft.errors import one_line_errors

SUBCOMMANDS = {
    "step": ("open_clip_starft.bench.step", "training step: FLYP vs StarFT vs naive port (s/step, images/s, FLOPs, peak memory)"),
    "data": ("open_clip_starft.bench.data", "data pipeline: ours vs upstream's get_wds_dataset (samples/s)"),
    "eval": ("open_clip_starft.bench.eval_throughput", "eval throughput (images/s) and zero-shot head cost, per model"),
    "waterbirds-lite": ("open_clip_starft.studies.waterbirds_lite.cli",
                        "alias of 'open-clip-starft waterbirds-lite' (an accuracy study, not a speed benchmark)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft bench", description=__doc__.split("\n")[0],
                                     epilog="'open-clip-starft bench SUBCOMMAND --help' shows a subcommand's flags.")
    sub = parser.add_subparsers(dest="what", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


@one_line_errors
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:  # each subcommand parses its own flags
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    build_parser().parse_args(argv)  # --help, or a usage error naming the subcommands
    return 2


if __name__ == "__main__":
    sys.exit(main())
