"""The StarFT training flags (``--starft-*``): the parser that ``open_clip_starft.main`` splits them off
with, and their checks. Here, below ``main``, so that the tools that read a run's settings (``export``,
``sweep``) parse them with the same parser without importing the entry point.
"""
from __future__ import annotations

import argparse
import math

from open_clip_starft.errors import ConfigError
from open_clip_starft.method.captions import CAPTION_TEMPLATE_SETS, list_suffix_modes
from open_clip_starft.method.descriptors import CONCEPTS
from open_clip_starft.method.forms import STAR_FORMS
from open_clip_starft.method.schedule import list_schedules


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the StarFT objective: λ, its schedule, the spurious captions and the mask (method/)."""
    g = parser.add_argument_group("StarFT objective")
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
    g.add_argument("--starft-star-form", choices=STAR_FORMS, default="softmax",
                   help="the Star term's form. softmax (default, the paper's, for every model): KL between the "
                        "teacher's and the student's softmax over each image's other-class spurious captions, at the "
                        "teacher's logit scale (a SigLIP bias cancels). sigmoid (--siglip models only): a Bernoulli KL "
                        "per image-caption pair between σ(t·s + b) of teacher and student, at the teacher's scale t "
                        "and bias b, summed over the same pairs and averaged over images.")


def add_caption_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the clean captions: class names by class id and their templates."""
    g = parser.add_argument_group("StarFT captions")
    g.add_argument("--starft-classnames", default="imagenet",
                   help="class names by class id: imagenet (OpenCLIP's 1000) or a file (one per line, JSON list, or JSON id→name).")
    g.add_argument("--starft-templates", default="single",
                   help=f"caption templates: {', '.join(CAPTION_TEMPLATE_SETS)} ('a photo of a {{}}.'; OpenCLIP's 80), "
                        "or a file with one '{}' template per line. Default single.")


def add_teacher_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the frozen zero-shot teacher: its caches and its BatchNorm statistics."""
    g = parser.add_argument_group("StarFT teacher")
    g.add_argument("--starft-teacher-text-cache-mb", type=float, default=1024,
                   help="memory for the teacher's features of spurious captions, each computed once (exact; "
                        "58,000 captions × 512 dims ≈ 113 MB for ImageNet + background); 0 turns it off. Default 1024.")
    g.add_argument("--starft-teacher-image-cache", action="store_true",
                   help="APPROXIMATION, off by default: the teacher's image features computed once per image on the "
                        "un-augmented image (eval transform) and reused every epoch, instead of on each step's "
                        "augmented view. Saves the teacher's image forward after the first epoch; memory: images × "
                        "embed dim × 2 bytes on the device.")
    g.add_argument("--starft-teacher-batchnorm", choices=("running", "batch"), default="running",
                   help="for image towers with BatchNorm (ResNets, EfficientNets; CLIP's ViTs have none): the "
                        "teacher normalises with its running statistics (running, the zero-shot model as it "
                        "predicts) or, like the student in train mode, with the batch's (batch: the Star term is 0 "
                        "at the first step; the teacher's statistics never change). Default running.")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the model being fine-tuned: BatchNorm statistics and memory layout."""
    g = parser.add_argument_group("StarFT model")
    g.add_argument("--starft-freeze-bn-stats", action="store_true",
                   help="for image towers with BatchNorm: every BatchNorm layer of the model being fine-tuned "
                        "normalises with the zero-shot model's running statistics and never updates them (eval "
                        "mode; its scale and shift still train), for FLYP (λ 0) and StarFT alike, so the model "
                        "evaluated is the model trained and the Star term is 0 at the first step with the default "
                        "--starft-teacher-batchnorm running. Unlike OpenCLIP's --lock-image-freeze-bn-stats it "
                        "needs no --lock-image. Off by default.")
    g.add_argument("--starft-channels-last", action="store_true",
                   help="the model's (and the teacher's) weights in channels-last memory layout, as timm's "
                        "--channels-last, for convolutional image towers (ResNets, EfficientNets, ConvNeXts): the "
                        "layout the fast convolution kernels of oneDNN (CPU) and cuDNN (GPU, AMP) use; ViTs are unaffected. The same numbers up to "
                        "float summation order; checkpoints load into either layout. Off by default.")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the training labels: where they are read and how many may be missing."""
    g = parser.add_argument_group("StarFT training data")
    g.add_argument("--starft-csv-label-key", default="label",
                   help="label column of a --dataset-type csv training file. Default label.")
    g.add_argument("--starft-max-skipped-fraction", type=float, default=0.01,
                   help="stop when more than this share of training samples lack a usable label. Default 0.01.")


def add_resume_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of how a --resume may continue a checkpoint."""
    g = parser.add_argument_group("StarFT resume")
    g.add_argument("--starft-allow-changed-settings", action="store_true",
                   help="with --resume: continue a checkpoint with other StarFT settings, batch size (mid-epoch) or "
                        "--epochs than it was trained with (refused by default, naming each difference); the change "
                        "is recorded in the checkpoint's settings history.")


def add_validation_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the eval sets scored during training and the checkpoint kept by them."""
    g = parser.add_argument_group("StarFT evaluation during training")
    g.add_argument("--starft-val", action="append", default=[], metavar="NAME=ROOT",
                   help="an eval set scored during training (repeatable): ROOT in any layout `open-clip-starft eval "
                        "--set` reads (shards with a 'group' key give worst-group accuracy). Logged as val/NAME/top1, "
                        "val/NAME/worst_group, val/NAME/avg_group, val/NAME/ece, … to the log, tensorboard, wandb and "
                        "checkpoints/results.jsonl; the zero-shot model is scored first (epoch 0).")
    g.add_argument("--starft-val-frequency", type=int, default=1, metavar="N",
                   help="score the --starft-val sets every N epochs (and after the last). Default 1.")
    g.add_argument("--starft-val-steps", type=int, default=0, metavar="K",
                   help="also score them every K optimizer steps within an epoch. Default 0 (off).")
    g.add_argument("--starft-val-classnames", default=None, metavar="imagenet|FILE",
                   help="class names of the --starft-val sets (default: --starft-classnames).")
    g.add_argument("--starft-val-templates", default=None, metavar="single|openai|FILE",
                   help="zero-shot head templates of the --starft-val sets (default: --starft-templates).")
    g.add_argument("--starft-select", default=None, metavar="NAME:METRIC",
                   help="keep checkpoints/best.pt: the epoch whose --starft-val set NAME scores best on METRIC "
                        "(top1, top5, worst_group, avg_group, per_class_mean, ece; ties broken by top-1), e.g. "
                        "val:worst_group. A choice on validation data: never name a test set here.")


# one function per flag group, in --help's order
FLAG_GROUPS = (add_method_flags,
               add_caption_flags,
               add_teacher_flags,
               add_model_flags,
               add_data_flags,
               add_resume_flags,
               add_validation_flags)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``--starft-*`` flags (``parse_known_args`` leaves upstream's flags to upstream)."""
    parser = argparse.ArgumentParser(prog="open_clip_starft.main", add_help=False, allow_abbrev=False,
                                     description="StarFT fine-tuning; all other flags are open_clip_train's.")
    for add_flags in FLAG_GROUPS:
        add_flags(parser)
    return parser


# flags that say how to start, not how the run trains: never recorded as a run's settings
NOT_SETTINGS = ("starft_allow_changed_settings",)


def starft_settings(namespace: argparse.Namespace) -> dict:
    """The ``--starft-*`` settings of ``namespace`` (what each checkpoint records under ``"starft"``)."""
    return {k: v for k, v in vars(namespace).items() if k.startswith("starft_") and k not in NOT_SETTINGS}


def refuse_unsupported(args: argparse.Namespace) -> None:
    """One-line errors for OpenCLIP flags (on upstream's parsed ``args``) that StarFT cannot honour."""
    if args.distill_model is not None:
        raise ConfigError("--distill-model cannot be combined with StarFT: the frozen zero-shot model is "
                          "StarFT's teacher already; drop --distill-model/--distill-pretrained")
    if "coca" in args.model.lower():
        raise ConfigError(f"--model {args.model}: CoCa's captioning loss has no StarFT counterpart in the paper; "
                          "pick a CLIP or SigLIP --model")
    if args.starft_star_form == "sigmoid" and not args.siglip:
        raise ConfigError("--starft-star-form sigmoid is the per-pair form of a sigmoid-loss model: add --siglip "
                          "(a SigLIP model with a logit_bias) or drop the flag (softmax, the default)")
    if args.model.startswith("local-dir:") and args.pretrained:
        raise ConfigError(
            f"--pretrained {args.pretrained} is ignored by OpenCLIP for --model {args.model} (the run would "
            "fine-tune the folder's weights and take them as the teacher): export the checkpoint as a local-dir "
            "model with `open-clip-starft export --checkpoint CKPT --model NAME --out DIR` and pass "
            "--model local-dir:DIR, or pass --model NAME --pretrained CKPT")
    if args.train_data is None and args.dataset_type == "synthetic":
        raise ConfigError("--dataset-type synthetic has no class labels: pass --train-data shards with 'cls'")


def check(starft: argparse.Namespace) -> None:
    """One-line errors for StarFT flag values that argparse alone would not catch."""
    if not (math.isfinite(starft.starft_lambda) and starft.starft_lambda >= 0):
        raise ConfigError(f"--starft-lambda {starft.starft_lambda:g} must be finite and ≥ 0: "
                          "use 0.5 (the paper), or 0 for FLYP")
    if starft.starft_schedule not in list_schedules():
        raise ConfigError(f"unknown --starft-schedule {starft.starft_schedule!r}: use one of {', '.join(list_schedules())}")
    if starft.starft_suffix not in list_suffix_modes():
        raise ConfigError(f"unknown --starft-suffix {starft.starft_suffix!r}: use one of {', '.join(list_suffix_modes())}")
    if starft.starft_random_words < 1:
        raise ConfigError(f"--starft-random-words {starft.starft_random_words} must be ≥ 1")
    if starft.starft_val_frequency < 1 or starft.starft_val_steps < 0:
        raise ConfigError(f"--starft-val-frequency {starft.starft_val_frequency} must be ≥ 1 and --starft-val-steps "
                          f"{starft.starft_val_steps} ≥ 0")
    if not 0 <= starft.starft_max_skipped_fraction <= 1:
        raise ConfigError(f"--starft-max-skipped-fraction {starft.starft_max_skipped_fraction:g} must be within 0..1")
