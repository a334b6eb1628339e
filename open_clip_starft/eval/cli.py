"""``open-clip-starft eval``: zero-shot evaluation of OpenCLIP checkpoints on eval sets.

ImageNet's shifts and group-shift sets, with top-1/top-5, per-class, per-group, worst-group and
average-group accuracy and expected calibration error.

    open-clip-starft eval --model ViT-B-16-quickgelu --pretrained zs=/ckpt/openai.pt \\
        --run logs/starft --epochs last --suite suite.yaml --out results.jsonl
    open-clip-starft eval --model local-dir:DIR --data /data/waterbirds --out wb.jsonl
    open-clip-starft eval --model M --pretrained FILE --set imagenet-r=/data/imagenet-r --set imagenet=/data/val --out r.jsonl

Checkpoints × sets; each set's zero-shot head (class names × templates) is computed once per
checkpoint (sets sharing class names and templates share it). Writes ``--out`` (JSON lines, one
record per checkpoint × set), a Markdown table (``--table``, default beside ``--out``) and
per-group accuracy plots (``--plots``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from open_clip_starft.errors import StarftError, UntrustedCheckpoint, one_line_errors
from open_clip_starft.eval.precision import EVAL_PRECISIONS
from open_clip_starft.eval.report import (ScalarReporter, check_clip_benchmark_files, plot_groups, record_scalars,
                                         write_clip_benchmark, write_jsonl, write_table)
from open_clip_starft.eval.sets import BUILTIN_SETS, FORMATS, EvalSetSpec, load_suite, prepare_set
from open_clip_starft.eval.sets.workers import default_workers

# The parser and everything it needs import neither torch nor open_clip: ``--help`` and a refused flag answer
# at once. The modules that run models (``models``, ``evaluator``) are imported by the functions that use
# them, after the command line is parsed.


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The eval-set options shared by ``eval`` and ``wise``."""
    g = parser.add_argument_group("eval sets (at least one of --data, --set, --suite)")
    g.add_argument("--data", action="append", default=[], metavar="ROOT",
                   help="an eval set: a class-subfolder folder, shards (pattern, .tar or folder), a CSV, a CLIP_benchmark "
                        "wds folder or a known release (Waterbirds, CIFAR-10.02, ObjectNet, PACS); named after its folder")
    g.add_argument("--set", action="append", default=[], metavar="NAME=ROOT",
                   help=f"a named eval set; built-in names take their settings: {', '.join(BUILTIN_SETS)}")
    g.add_argument("--suite", metavar="FILE", help="a JSON or YAML suite file naming sets with their roots")
    g.add_argument("--id", dest="id_set", metavar="NAME", help="the in-distribution set of the table (default: imagenet or the first set)")
    g.add_argument("--format", default="auto", choices=FORMATS, help="layout of --data/--set roots (default: detected)")
    g.add_argument("--classnames", metavar="imagenet|FILE", help="class names by label (default: the set's own)")
    g.add_argument("--templates", metavar="single|openai|FILE", help="caption templates of the head (default: the set's own or single)")
    g.add_argument("--subset", metavar="imagenet-r|imagenet-a|FILE|IDS", help="restrict the logits to these head class ids")
    g.add_argument("--subset-labels", default=None, choices=("local", "full"),
                   help="labels are positions in the subset (local, as ImageNet-R/-A folders give) or head class ids (full)")
    g.add_argument("--split", metavar="NAME", help="CLIP_benchmark split folder or Waterbirds split (default test)")
    g.add_argument("--csv-path-key", metavar="COL")
    g.add_argument("--csv-label-key", metavar="COL")
    g.add_argument("--csv-group-key", metavar="COL")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="data-loader workers (default: the CPUs this process has, at most 4)")
    g.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--precision", default=None, choices=EVAL_PRECISIONS,
                   help="autocast precision of the forward passes (default: a --run's own precision, from its "
                        "params.txt, so the numbers match its training log; fp32 otherwise)")
    g.add_argument("--ece-bins", type=int, default=15, help="bins of the expected calibration error (default 15)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: a bar per set on a terminal, a line every 30 s in logs)")


def set_specs_from_args(args) -> tuple[list[EvalSetSpec], str | None]:
    """Eval set specs from ``--suite``, ``--set`` and ``--data`` (CLI class/template/subset options
    apply to ``--set`` and ``--data`` sets)."""
    specs, id_set = [], None
    if args.suite:
        specs, id_set = load_suite(args.suite)
    overrides = {k: v for k, v in {
        "format": args.format, "classnames": args.classnames, "templates": args.templates, "subset": args.subset,
        "subset_labels": args.subset_labels, "split": args.split, "csv_path_key": args.csv_path_key,
        "csv_label_key": args.csv_label_key, "csv_group_key": args.csv_group_key}.items() if v is not None}
    for item in args.set:
        if "=" not in item:
            raise StarftError(f"--set {item!r}: write NAME=ROOT, e.g. imagenet-r=/data/imagenet-r")
        name, root = item.split("=", 1)
        specs.append(EvalSetSpec(name=name, root=root, **overrides))
    for root in args.data:
        name = os.path.basename(root.rstrip("/")) or root
        name = name.split("{")[0].rstrip("-_.") or name
        if name.lower().endswith((".csv", ".tsv", ".tar")):
            name = os.path.splitext(name)[0]
        specs.append(EvalSetSpec(name=name, root=root, **overrides))
    if not specs:
        raise StarftError("no eval set: pass --data ROOT, --set NAME=ROOT or --suite FILE")
    names = [s.name for s in specs]
    for i, s in enumerate(specs):
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{names[:i].count(s.name) + 1}"
    id_set = args.id_set or id_set
    if id_set is not None and id_set not in [s.name for s in specs]:
        raise StarftError(f"--id {id_set!r} is not one of the sets ({', '.join(s.name for s in specs)}): name one of them")
    return specs, id_set


TRUST_HELP = ("load checkpoints that hold objects besides weights (unpickling can run code: only for files you "
              "made yourself; default: weights only, anything else refused)")


@contextlib.contextmanager
def trust_flag():
    """A refused checkpoint's error, with the flag that allows it (commands with ``--trust-checkpoint``)."""
    try:
        yield
    except UntrustedCheckpoint as e:
        raise UntrustedCheckpoint(f"{e} (--trust-checkpoint)") from None


def check_run_args(args) -> None:
    """The running options' ranges; ``--device`` not given becomes cuda when available, else cpu (torch is
    imported here, once the command line is read)."""
    if args.batch_size < 1 or args.workers < 0 or args.ece_bins < 1:
        raise StarftError("--batch-size and --ece-bins must be ≥ 1 and --workers ≥ 0")
    if args.device is None:
        from open_clip_starft.eval.models import default_device
        args.device = default_device()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--model", metavar="NAME|local-dir:DIR", help="OpenCLIP architecture (default for --run: its params.txt)")
    g.add_argument("--pretrained", action="append", default=[], metavar="[LABEL=]FILE|TAG",
                   help="weights file of --model, or an OpenCLIP pretrained tag of a model name (repeatable: one "
                        "checkpoint each)")
    g.add_argument("--run", action="append", default=[], metavar="DIR", help="a training run folder (LOGS/NAME): its epoch checkpoints")
    g.add_argument("--epochs", default="all", metavar="all|last|best|N,M", help="which epochs of each --run: all (default), last, best (the --starft-select epoch) or N,M")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    add_data_args(parser)
    o = parser.add_argument_group("outputs")
    o.add_argument("--out", required=True, metavar="results.jsonl", help="JSON lines, one record per checkpoint × set")
    o.add_argument("--table", metavar="FILE.md", help="Markdown table (default: --out with .md)")
    o.add_argument("--plots", metavar="DIR", help="per-group accuracy plots (default: --out without suffix + _plots)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--results-format", default="jsonl", choices=("jsonl", "clip_benchmark"),
                   help="clip_benchmark: also one CLIP_benchmark result JSON per checkpoint × set (acc1, acc5, "
                        "mean_per_class_recall, plus worst_group_acc, avg_group_acc, ece), which `clip_benchmark "
                        "build` aggregates, in --out without suffix + _clip_benchmark/")
    add_report_args(parser)
    add_run_args(parser)
    return parser


def add_report_args(parser: argparse.ArgumentParser) -> None:
    """``--report-to`` as OpenCLIP's: the scalars of every record to tensorboard and/or wandb (eval, wise, sweep)."""
    g = parser.add_argument_group("reporting (OpenCLIP's --report-to)")
    g.add_argument("--report-to", default="", metavar="tensorboard|wandb|all",
                   help="also log each record's metrics (eval/SET/top1, eval/SET/worst_group, …) to tensorboard "
                        "and/or wandb (comma list); the step is the checkpoint's position")
    g.add_argument("--tensorboard-dir", metavar="DIR", help="event files (default: --out without suffix + _tensorboard)")
    g.add_argument("--wandb-project", default="open-clip-starft", help="wandb project (default open-clip-starft)")


def reporter_from_args(args, out_stem: str, run_name: str) -> ScalarReporter:
    return ScalarReporter(args.report_to, args.tensorboard_dir or out_stem + "_tensorboard",
                          wandb_init={"project": args.wandb_project, "name": run_name})


def default_paths(out: str, table: str | None, plots: str | None) -> tuple[str, str]:
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else os.path.splitext(out)[0]
    return table or stem + ".md", plots or stem + "_plots"


def run(args) -> int:
    specs, id_set = set_specs_from_args(args)
    check_run_args(args)
    from open_clip_starft.eval.evaluator import Evaluator
    from open_clip_starft.eval.models import ModelCache, checkpoints_from_args
    checkpoints = checkpoints_from_args(args.model, args.pretrained, args.run, args.epochs)
    if args.results_format == "clip_benchmark":  # file names that collide are refused before anything runs
        check_clip_benchmark_files([(s.name, c.label, c.model) for c in checkpoints for s in specs])
    prepared = [prepare_set(s) for s in specs]  # every set is checked before any model runs
    table_path, plots_dir = default_paths(args.out, args.table, args.plots)
    print(f"evaluating {len(checkpoints)} checkpoint(s) × {len(prepared)} set(s) on {args.device}")
    for p in prepared:
        n = len(p.items) if p.items is not None else f"{len(p.shards)} shard(s)"
        print(f"  set {p.name}: {p.settings['format']}, {p.num_classes} classes, {len(p.templates)} template(s), {n}"
              + p.describe_missing_classes())
    cache, records, start = ModelCache(args.device, trust=args.trust_checkpoint), [], time.time()
    stem = os.path.splitext(table_path)[0]
    reporter = reporter_from_args(args, stem, os.path.basename(stem))
    for position, ckpt in enumerate(checkpoints):
        model, preprocess, tokenizer = cache.load(ckpt)
        precision = args.precision or ckpt.precision or "fp32"  # a run's numbers at the precision it trained at
        if ckpt.run and not args.precision and not ckpt.precision:
            print(f"  note: {ckpt.label}: params.txt of {os.path.basename(ckpt.run)} gives no precision eval runs at: "
                  "scored at fp32 (pass --precision to choose)")
        evaluator = Evaluator(model, tokenizer, preprocess, device=args.device, precision=precision,
                              batch_size=args.batch_size, workers=args.workers, ece_bins=args.ece_bins)
        records += evaluator.evaluate_sets(
            prepared, label=ckpt.label, log=print, progress=not args.no_progress,
            settings={"model": ckpt.model, "pretrained": ckpt.pretrained, "batch_size": args.batch_size})
        write_jsonl(records, args.out)  # after every checkpoint, so a long run leaves its results
        reporter.log({k: v for r in records if r["checkpoint"] == ckpt.label
                      for k, v in record_scalars(r, "eval").items()}, position, extra={"checkpoint": ckpt.label})
    reporter.close()
    if args.results_format == "clip_benchmark":
        written = write_clip_benchmark(records, stem + "_clip_benchmark")
        print(f"CLIP_benchmark results: {len(written)} file(s) in {stem}_clip_benchmark")
    print("\n" + write_table(records, table_path, id_set))
    plots = [] if args.no_plots else plot_groups(records, plots_dir)
    print(f"results: {args.out}\ntable:   {table_path}" + (f"\nplots:   {', '.join(plots)}" if plots else "")
          + f"\ndone in {time.time() - start:.0f} s")
    return 0


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with trust_flag():
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
