"""``open-clip-starft bench step|data|eval``: the speed benchmarks, one module each.

- ``step``: one training step, FLYP vs StarFT vs a naive port (time, FLOPs, peak memory);
- ``data``: our training data pipeline vs upstream's ``get_wds_dataset`` (samples/s);
- ``eval``: eval throughput and zero-shot head cost per model (also ``open-clip-starft eval-bench``).

Every subcommand has its own ``--help``; none writes a file unless given ``--out``.
"""
from __future__ import annotations

import argparse
import sys

from open_clip_starft.errors import one_line_errors
from open_clip_starft.tools.commands import dispatch, table_parser

SUBCOMMANDS = {
    "step": ("open_clip_starft.bench.step", "training step: FLYP vs StarFT vs naive port (s/step, images/s, FLOPs, peak memory)"),
    "data": ("open_clip_starft.bench.data", "data pipeline: ours vs upstream's get_wds_dataset (samples/s)"),
    "eval": ("open_clip_starft.bench.eval_throughput", "eval throughput (images/s) and zero-shot head cost, per model"),
}


def build_parser() -> argparse.ArgumentParser:
    return table_parser("open-clip-starft bench", SUBCOMMANDS, __doc__.split("\n")[0])


@one_line_errors
def main(argv=None) -> int:
    return dispatch("open-clip-starft bench", SUBCOMMANDS, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
