"""The ``open-clip-starft`` command: ``train`` (the same as ``python -m open_clip_starft.main``)
and ``demo`` (a short real StarFT run on a built-in dataset)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "open_clip_starft.main", "demo": "open_clip_starft.demo"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: open-clip-starft {train,demo} [args...]\n\n"
              "  train  StarFT fine-tuning through OpenCLIP's training code (all open_clip_train flags work)\n"
              "  demo   build a small built-in dataset and model and run a short StarFT fine-tune",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib
    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
