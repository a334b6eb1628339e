"""``python -m open_clip_starft.main``: StarFT fine-tuning through OpenCLIP's own ``main``.

The StarFT flags (``--starft-*``) are split off here; everything else goes to
``open_clip_train``'s parser and keeps its upstream meaning. Run it as upstream's module::

    torchrun --nproc-per-node 8 -m open_clip_starft.main --starft-lambda 0.5 \\
        --train-data '/data/imagenet/train-{0000..1023}.tar' --dataset-type webdataset \\
        --model ViT-B-16 --pretrained /path/to/weights.pt ...
"""
from __future__ import annotations

import argparse
import logging
import math
import sys

import open_clip_train.main as host

from open_clip_starft.method.captions import CAPTION_TEMPLATE_SETS, list_suffix_modes
from open_clip_starft.method.descriptors import CONCEPTS
from open_clip_starft.errors import StarftError
from open_clip_starft.host.hooks import StarftHooks
from open_clip_starft.host.preemption import FLAG, Preempted
from open_clip_starft.method.schedule import list_schedules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open_clip_starft.main", add_help=False, allow_abbrev=False,
                                     description="StarFT fine-tuning; all other flags are open_clip_train's.")
    g = parser.add_argument_group("StarFT")
    g.add_argument("--starft-lambda", type=float, default=0.5,
                   help="weight λ of the Star term at the start of the run (0: plain contrastive fine-tuning, FLYP). Default 0.5.")
    g.add_argument("--starft-schedule", default="linear",
                   help=f"λ decay: {', '.join(list_schedules())}. linear: per step to 0 over the run (default); "
                        "staircase: the release, λ·(1−(epoch+1)/epochs) per epoch; constant: no decay.")
    g.add_argument("--starft-concepts", default="background",
                   help=f"descriptor sets: {', '.join(CONCEPTS)}, all, a comma list, or a .txt/.json file. Default background.")
    g.add_argument("--starft-suffix", default="spurious",
                   help=f"spurious caption: {', '.join(list_suffix_modes())}. spurious: a descriptor per sample (default); "
                        "random: random vocabulary words (ablation); none: the clean caption (ablation).")
    g.add_argument("--starft-random-words", type=int, default=3,
                   help="words appended by --starft-suffix random. Default 3.")
    g.add_argument("--starft-no-mask", action="store_true",
                   help="keep same-class pairs in the Star softmax (ablation; the default masks them).")
    g.add_argument("--starft-classnames", default="imagenet",
                   help="class names by class id: imagenet (OpenCLIP's 1000) or a file (one per line, JSON list, or JSON id→name).")
    g.add_argument("--starft-templates", default="single",
                   help=f"caption templates: {', '.join(CAPTION_TEMPLATE_SETS)} ('a photo of a {{}}.'; OpenCLIP's 80), "
                        "or a file with one '{}' template per line. Default single.")
    g.add_argument("--starft-teacher-text-cache-mb", type=float, default=1024,
                   help="memory for the teacher's features of spurious captions, each computed once (exact; "
                        "58,000 captions × 512 dims ≈ 113 MB for ImageNet + background); 0 turns it off. Default 1024.")
    g.add_argument("--starft-teacher-image-cache", action="store_true",
                   help="APPROXIMATION, off by default: the teacher's image features computed once per image on the "
                        "un-augmented image (eval transform) and reused every epoch, instead of on each step's "
                        "augmented view. Saves the teacher's image forward after the first epoch; memory: images × "
                        "embed dim × 2 bytes on the device.")
    g.add_argument("--starft-csv-label-key", default="label",
                   help="label column of a --dataset-type csv training file. Default label.")
    g.add_argument("--starft-max-skipped-fraction", type=float, default=0.01,
                   help="stop when more than this share of training samples lack a usable label. Default 0.01.")
    return parser


def check(starft: argparse.Namespace) -> None:
    """One-line errors for StarFT flag values that argparse alone would not catch."""
    if not (math.isfinite(starft.starft_lambda) and starft.starft_lambda >= 0):
        raise StarftError(f"--starft-lambda {starft.starft_lambda:g} must be finite and ≥ 0: "
                          "use 0.5 (the paper), or 0 for FLYP")
    if starft.starft_schedule not in list_schedules():
        raise StarftError(f"unknown --starft-schedule {starft.starft_schedule!r}: use one of {', '.join(list_schedules())}")
    if starft.starft_suffix not in list_suffix_modes():
        raise StarftError(f"unknown --starft-suffix {starft.starft_suffix!r}: use one of {', '.join(list_suffix_modes())}")
    if starft.starft_random_words < 1:
        raise StarftError(f"--starft-random-words {starft.starft_random_words} must be ≥ 1")
    if not 0 <= starft.starft_max_skipped_fraction <= 1:
        raise StarftError(f"--starft-max-skipped-fraction {starft.starft_max_skipped_fraction:g} must be within 0..1")


def quiet_torch_loggers() -> None:
    """Upstream's setup_logging sets every logger to INFO, so torch's compile statistics would be
    dumped at exit; put torch's own loggers back to WARNING."""
    for name in list(logging.root.manager.loggerDict):
        if name == "torch" or name.startswith("torch."):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nopen_clip_train options (upstream):")
        host.parse_args(["--help"])  # prints upstream's help and exits
    starft, rest = parser.parse_known_args(argv)
    try:
        check(starft)
        FLAG.install()
        with StarftHooks(starft):
            status = host.main(rest)
    except StarftError as e:
        print(f"open-clip-starft: error: {e}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"open-clip-starft: stopped by a signal; saved {stop}; continue with --resume latest", file=sys.stderr)
        return 0
    finally:
        FLAG.uninstall()
        quiet_torch_loggers()
    if status == -1:  # upstream returns -1 (no exception) when it refuses to start, e.g. the run name exists
        print("open-clip-starft: error: OpenCLIP refused to start the run (see above): pass a new --name, "
              "or --resume latest to continue it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
