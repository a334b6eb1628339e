"""The ``open-clip-starft`` command and its subcommands.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only dispatches
(``tools.commands.dispatch``, the one dispatch of every command with subcommands).
"""
from __future__ import annotations

import sys

from open_clip_starft.errors import ConfigError, one_line_errors
from open_clip_starft.tools.commands import dispatch

COMMANDS = {
    "train": ("open_clip_starft.main", "StarFT fine-tuning through OpenCLIP's training code (all open_clip_train flags work)"),
    "demo": ("open_clip_starft.demo.run", "build a small built-in dataset and model and run a short StarFT fine-tune"),
    "descriptors": ("open_clip_starft.tools.descriptors.cli", "generate descriptor sets with a language model; show, validate, stats"),
    "eval": ("open_clip_starft.eval.cli", "zero-shot eval of checkpoints on ImageNet shifts and group-shift sets (top-1/5, worst-group, ECE)"),
    "sweep": ("open_clip_starft.tools.sweep", "StarFT over a grid of λ × schedule × descriptors (and FLYP), chosen on a validation set you name"),
    "wise": ("open_clip_starft.eval.wise", "WiSE-FT weight interpolation between zero-shot and fine-tuned checkpoints, evaluated per α"),
    "make-shards": ("open_clip_starft.tools.make_shards", "class-subfolder tree or CSV to webdataset shards (resumable, parallel)"),
    "export": ("open_clip_starft.tools.export", "a training checkpoint as a folder plain OpenCLIP loads (Hub layout) with a model card"),
    "bench": ("open_clip_starft.bench.cli", "speed benchmarks: step (FLYP vs StarFT vs naive port), data (ours vs upstream's pipeline), eval (throughput)"),
    "eval-bench": ("open_clip_starft.bench.eval_throughput", "alias of 'bench eval'"),
}


@one_line_errors
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["demo-study"], ["waterbirds-lite"]) or (argv[:1] == ["demo"] and "--study" in argv):
        raise ConfigError(f"'{argv[0]}' is an accuracy study, no longer installed with the package: run it from a "
                          "checkout of the repository (python -m studies.demo_study, python -m studies.waterbirds_lite)")
    return dispatch("open-clip-starft", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
