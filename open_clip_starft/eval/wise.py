"""``open-clip-starft wise``: WiSE-FT weight interpolation, evaluated per α.

θ(α) = (1−α)·θ_zero-shot + α·θ_fine-tuned for a list of α, each evaluated on the chosen sets.

    open-clip-starft wise --model ViT-B-16-quickgelu --zero-shot /ckpt/openai.pt \\
        --fine-tuned logs/starft/checkpoints/epoch_10.pt --alphas 0:1:0.1 --suite suite.yaml \\
        --out wise/ --save-alpha 0.5 --save wise/alpha-0.5

Writes ``OUT/wise.json`` (the curve: per α the ID accuracy, the OOD average and every set's
metrics), ``OUT/wise.png`` (ID vs OOD accuracy, one point per α), ``OUT/results.jsonl`` and
``OUT/results.md`` (checkpoints ``alpha=…`` side by side). ``--save`` writes the chosen α's
weights in OpenCLIP's format: a ``.pt``/``.bin`` state dict (``--model M --pretrained FILE``) or a
``local-dir:`` folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from open_clip_starft.data import files
from open_clip_starft.errors import ConfigError, StarftError, one_line_errors, with_flag
from open_clip_starft.eval.cli import (TRUST_HELP, add_data_args, add_report_args, add_run_args, check_run_args,
                                      reporter_from_args, set_specs_from_args, trust_flag)
from open_clip_starft.eval.progress import Progress
from open_clip_starft.eval.report import layout, plot_wise, record_scalars, summary, write_jsonl, write_table
from open_clip_starft.eval.sets import prepare_set

# As in ``eval.cli``: ``models`` and ``evaluator`` (torch, open_clip) are imported by the functions that run
# models, so ``--help`` and a refused flag answer at once.


def parse_alphas(text: str) -> list[float]:
    """``0,0.25,1`` or ``START:STOP:STEP`` (inclusive; the step must divide STOP − START), each in [0, 1]."""
    if ":" in text:
        return _alpha_range(text)
    try:
        alphas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--alphas {text!r}: write a comma list (0,0.5,1) or START:STOP:STEP (0:1:0.1)") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):  # NaN fails this too
        raise ConfigError(f"--alphas {text!r}: every α must lie in [0, 1]")
    return sorted(set(alphas))


def _alpha_range(text: str) -> list[float]:
    """``START:STOP:STEP`` as the α list, each fault named: not three numbers, not finite or outside
    [0, 1], a step ≤ 0, STOP below START, a step that does not divide the range."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--alphas {text!r}: write START:STOP:STEP with three numbers, e.g. 0:1:0.1") from None
    if not all(0 <= v <= 1 for v in (start, stop)) or not 0 < step <= 1:  # inf and NaN fail here
        raise ConfigError(f"--alphas {text!r}: START and STOP must lie in [0, 1] and STEP in (0, 1], e.g. 0:1:0.1")
    if stop < start:
        raise ConfigError(f"--alphas {text!r}: STOP {stop:g} is below START {start:g}: write {stop:g}:{start:g}:{step:g}")
    n = round((stop - start) / step)
    if abs(start + n * step - stop) > 1e-9:
        raise ConfigError(f"--alphas {text!r}: the step {step:g} does not divide {start:g}..{stop:g} (the last α would "
                          f"be {start + int((stop - start) / step + 1e-9) * step:g}, not {stop:g}): pick a step that divides it, "
                          f"e.g. {(stop - start) / max(n, 1):g} ({max(n, 1)} steps)")
    return sorted({round(start + i * step, 10) for i in range(n + 1)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft wise", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--model", required=True, metavar="NAME|local-dir:DIR", help="OpenCLIP architecture of both checkpoints")
    g.add_argument("--zero-shot", metavar="FILE|TAG", help="zero-shot weights: a file, or an OpenCLIP pretrained tag "
                   "of a model name (default: --model's own, e.g. a local-dir's)")
    g.add_argument("--fine-tuned", required=True, metavar="FILE", help="fine-tuned weights (a training checkpoint or state dict)")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    g.add_argument("--alphas", default="0:1:0.1", help="α list: 0,0.5,1 or START:STOP:STEP (default 0:1:0.1)")
    add_data_args(parser)
    o = parser.add_argument_group("outputs")
    o.add_argument("--out", required=True, metavar="DIR", help="folder for wise.json, wise.png, results.jsonl and results.md")
    o.add_argument("--save-alpha", metavar="A|best", help="save the weights of this α (best: the highest OOD average, "
                   "else worst-group average, else ID accuracy)")
    o.add_argument("--save", metavar="PATH", help="where --save-alpha's weights go: FILE.pt or a folder (local-dir format); "
                   "default OUT/wise-alpha-A")
    o.add_argument("--no-plots", action="store_true")
    add_report_args(parser)
    add_run_args(parser)
    return parser


def curve(records: list[dict], alphas: list[float], id_set: str | None) -> tuple[list[dict], str, str]:
    """Per α: ``alpha``, ``id``, ``ood_avg``, ``worst_group_avg`` and ``sets``; with ``x``/``y`` for the plot."""
    id_name, ood, group_sets = layout(records, id_set)
    rows = summary(records, id_set)
    points = []
    for a in alphas:
        label = f"alpha={a:g}"
        row = rows[label]
        wg = [v["wg"] for v in row["group"].values()]
        points.append({
            "alpha": a, "checkpoint": label, "id": row["id"], "ood_avg": row["ood_avg"],
            "worst_group_avg": sum(wg) / len(wg) if wg else None,
            "sets": {r["dataset"]: {k: r[k] for k in ("top1", "top5", "worst_group", "avg_group", "ece", "n")}
                     for r in records if r["checkpoint"] == label},
        })
    if id_name and ood:
        x_key, y_key, xl, yl = "id", "ood_avg", f"{id_name} (ID) top-1 (%)", f"OOD average top-1 (%) over {', '.join(ood)}"
    elif id_name and group_sets:
        x_key, y_key, xl, yl = "id", "worst_group_avg", f"{id_name} (ID) top-1 (%)", "worst-group accuracy (%)"
    elif group_sets:
        x_key, y_key, xl, yl = "alpha", "worst_group_avg", "α", "worst-group accuracy (%)"
    else:
        x_key, y_key, xl, yl = "alpha", "id", "α", f"{id_name} top-1 (%)"
    for p in points:  # plot_wise shows x and y in %; α is shown as it is
        p["x"] = p[x_key] / 100 if x_key == "alpha" else p[x_key]
        p["y"] = p[y_key]
    return points, xl, yl


def choose_alpha(points: list[dict], spec: str) -> float:
    if spec == "best":
        key = next(k for k in ("ood_avg", "worst_group_avg", "id") if points[0][k] is not None)
        return max(points, key=lambda p: p[key])["alpha"]
    try:
        alpha = float(spec)
    except ValueError:
        raise StarftError(f"--save-alpha {spec!r}: give one of the evaluated α or 'best'") from None
    if alpha not in [p["alpha"] for p in points]:
        listed = ", ".join(f"{p['alpha']:g}" for p in points)
        raise StarftError(f"--save-alpha {spec}: not among --alphas ({listed})")
    return alpha


def _check_weights_args(args) -> None:
    """``--fine-tuned`` is an existing file; ``--zero-shot`` an existing file or a pretrained tag OpenCLIP knows
    for a model name; without ``--zero-shot`` the ``--model`` must hold weights of its own."""
    from open_clip_starft.eval.models import check_weights_value, local_dir_weights
    if args.zero_shot is not None:
        try:
            check_weights_value(args.zero_shot, args.model)
        except StarftError as e:
            raise with_flag(e, "--zero-shot") from None
    elif not (args.model.startswith("local-dir:") and local_dir_weights(args.model)):
        raise StarftError(f"--model {args.model} has no weights of its own here: pass --zero-shot FILE "
                          "(the pretrained weights the fine-tuning started from)")
    if not os.path.isfile(args.fine_tuned):
        raise ConfigError(f"--fine-tuned {args.fine_tuned!r} is not an existing file (relative to {os.getcwd()}): "
                          "give the fine-tuned checkpoint's path")


def _trained_image_size(checkpoint: str) -> int | None:
    """The ``--force-image-size`` of the run a training checkpoint belongs to (``RUN/params.txt``), if any."""
    from open_clip_starft.eval.models import read_params
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "params.txt")
    size = read_params(path).get("force_image_size") if os.path.isfile(path) and os.path.getsize(path) else None
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
    return None if size in (None, "None") else size


def endpoints(args):
    """``(model, preprocess, tokenizer, zero-shot state dict, fine-tuned state dict)``: both loaded into
    ``--model`` without any position-embedding resize (weights of another image size are refused)."""
    from open_clip_starft.eval.models import create_model, load_weights
    zero_shot_is_file = args.zero_shot is not None and os.path.isfile(args.zero_shot)
    tag = args.zero_shot if args.zero_shot is not None and not zero_shot_is_file else None
    model, preprocess, tokenizer = create_model(args.model, args.device, tag, trust=args.trust_checkpoint,
                                                own_weights=not zero_shot_is_file)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    trained = _trained_image_size(args.fine_tuned)
    if trained is not None and trained != size:
        raise ConfigError(f"--fine-tuned {args.fine_tuned} was trained at image size {trained} (its run's params.txt) but "
                          f"--model {args.model} takes {size}: interpolate weights of one image size")
    if zero_shot_is_file:
        load_weights(model, args.zero_shot, args.model, trust=args.trust_checkpoint, resize=False)
    zero_shot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_weights(model, args.fine_tuned, args.model, trust=args.trust_checkpoint, resize=False)
    fine_tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, preprocess, tokenizer, zero_shot, fine_tuned


def run(args) -> int:
    from open_clip_starft.eval.evaluator import Evaluator
    from open_clip_starft.eval.models import interpolate_state_dicts, local_dir_weights, save_openclip
    check_run_args(args)
    alphas = parse_alphas(args.alphas)
    _check_weights_args(args)
    specs, id_set = set_specs_from_args(args)
    prepared = [prepare_set(s) for s in specs]
    zero_shot_file = args.zero_shot or local_dir_weights(args.model)
    model, preprocess, tokenizer, zero_shot, fine_tuned = endpoints(args)
    os.makedirs(args.out, exist_ok=True)
    print(f"WiSE-FT: {len(alphas)} α × {len(prepared)} set(s) on {args.device}")
    records, start = [], time.time()
    settings = {"model": args.model, "zero_shot": zero_shot_file, "fine_tuned": args.fine_tuned, "batch_size": args.batch_size}
    evaluator = Evaluator(model, tokenizer, preprocess, device=args.device, precision=args.precision or "fp32",
                          batch_size=args.batch_size, workers=args.workers, ece_bins=args.ece_bins)
    reporter = reporter_from_args(args, os.path.join(args.out, "wise"), os.path.basename(os.path.abspath(args.out)))
    with Progress(len(alphas), "WiSE-FT", unit="α", enabled=not args.no_progress, interval_s=0) as bar:
        for position, a in enumerate(alphas):
            model.load_state_dict(interpolate_state_dicts(zero_shot, fine_tuned, a))
            evaluator.weights_changed()
            records += evaluator.evaluate_sets(prepared, label=f"alpha={a:g}", settings={**settings, "alpha": a},
                                               log=bar.write, progress=not args.no_progress)
            write_jsonl(records, os.path.join(args.out, "results.jsonl"))  # after every α, so a long run leaves its results
            reporter.log({k: v for r in records[-len(prepared):] for k, v in record_scalars(r, "wise").items()},
                         position, extra={"alpha": a})
            bar.update(1)
    reporter.close()
    points, x_label, y_label = curve(records, alphas, id_set)
    result = {"model": args.model, "zero_shot": zero_shot_file, "fine_tuned": args.fine_tuned,
              "x": x_label, "y": y_label, "points": points}
    print("\n" + write_table(records, os.path.join(args.out, "results.md"), id_set))
    if args.save_alpha is not None or args.save is not None:
        alpha = choose_alpha(points, args.save_alpha or "best")
        target = args.save or os.path.join(args.out, f"wise-alpha-{alpha:g}")
        saved = save_openclip(interpolate_state_dicts(zero_shot, fine_tuned, alpha), args.model, target)
        result["saved"] = {"alpha": alpha, "path": saved}
        how = f"--model {saved}" if saved.startswith("local-dir:") else f"--model {args.model} --pretrained {saved}"
        print(f"saved θ(α={alpha:g}) in OpenCLIP format: use {how}")
    files.write_json(os.path.join(args.out, "wise.json"), result)
    if not args.no_plots:
        plot_wise(points, os.path.join(args.out, "wise.png"), x_label, y_label)
    print(f"curve: {os.path.join(args.out, 'wise.json')}" + ("" if args.no_plots else f", {os.path.join(args.out, 'wise.png')}")
          + f"\ndone in {time.time() - start:.0f} s")
    return 0


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with trust_flag():
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
