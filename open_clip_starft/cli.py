"""The ``open-clip-starft`` command and its subcommands.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only dispatches
(``tools.commands.dispatch``, the one dispatch of every command with subcommands).
"""
from __future__ import annotations

import sys

from open_clip_starft.errors import one_line_errors
from open_clip_starft.tools.commands import dispatch

COMMANDS = {
    "train": ("open_clip_starft.main", "StarFT fine-tuning through OpenCLIP's training code (all open_clip_train flags work)"),
    "demo": ("open_clip_starft.demo.run", "build a small built-in dataset and model and run a short StarFT fine-tune"),
    "demo-study": ("open_clip_starft.studies.demo_study", "the accuracy study behind the demo's setting (units × λ × schedule, WiSE-FT curves)"),
    "descriptors": ("open_clip_starft.tools.descriptors.cli", "generate descriptor sets with a language model; show, validate, stats"),
    "eval": ("open_clip_starft.eval.cli", "zero-shot eval of checkpoints on ImageNet shifts and group-shift sets (top-1/5, worst-group, ECE)"),
    "sweep": ("open_clip_starft.tools.sweep", "StarFT over a grid of λ × schedule × descriptors (and FLYP), chosen on a validation set you name"),
    "wise": ("open_clip_starft.eval.wise", "WiSE-FT weight interpolation between zero-shot and fine-tuned checkpoints, evaluated per α"),
    "make-shards": ("open_clip_starft.tools.make_shards", "class-subfolder tree or CSV to webdataset shards (resumable, parallel)"),
    "export": ("open_clip_starft.tools.export", "a training checkpoint as a folder plain OpenCLIP loads (Hub layout) with a model card"),
    "bench": ("open_clip_starft.bench.cli", "speed benchmarks: step (FLYP vs StarFT vs naive port), data (ours vs upstream's pipeline), eval (throughput)"),
    "eval-bench": ("open_clip_starft.bench.eval_throughput", "alias of 'bench eval'"),
    "waterbirds-lite": ("open_clip_starft.studies.waterbirds_lite.cli", "the Waterbirds-lite accuracy study on real photographs: build, pretrain, run, report, all"),
}


@one_line_errors
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"] and "--study" in argv:  # the study moved out of the demo; old form kept one release
        print("open-clip-starft: warning: 'demo --study' is now 'demo-study'", file=sys.stderr)
        argv = ["demo-study", *(a for a in argv[1:] if a != "--study")]
    return dispatch("open-clip-starft", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
