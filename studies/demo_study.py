"""``python -m studies.demo_study``: the evidence behind the demo's StarFT setting.

For each pre-training seed (one independent unit: its own data draws and its own zero-shot
model), the demo's data and zero-shot model, the competence check, then an ``open-clip-starft
sweep`` over λ × schedule with FLYP and WiSE-FT curves (α 0..1 by 0.1). A seed whose
pre-training failed is recorded as such and left out of the comparisons. Writes:

- ``DOCS/demo.json``: one record per evaluated model (zero-shot, FLYP, every StarFT setting,
  every WiSE-FT α) with the fields of ``RECORD_FIELDS``; ``selected`` marks each unit's
  validation-chosen StarFT setting;
- ``DOCS/demo.md``: the comparisons computed from those records (``summarise``);
- ``DOCS/demo.png``: the worst-group vs in-distribution frontier of each unit.
"""
from __future__ import annotations

import argparse
import os
import statistics

from open_clip_starft.data.files import write_text
from open_clip_starft.demo import run as demo_run
from open_clip_starft.errors import StarftError, one_line_errors
from open_clip_starft.eval.frontier import fmt, matched_worst_group, plot_frontiers, unit_summary, write_json
from open_clip_starft.tools import sweep

RECORD_FIELDS = ("protocol", "method", "unit", "split", "pretrain_seed", "seed", "lam", "schedule", "descriptors",
                 "alpha", "avg", "worst_group", "in_dist", "val_avg", "val_worst_group", "val_in_dist", "heldout",
                 "selected")
WISE_ALPHAS = "0:1:0.1"


def _record(unit_seed: int, method: str, row: dict, alpha=None, selected=False, **extra) -> dict:
    rec = {"protocol": "demo", "method": method, "unit": f"pretrain-seed{unit_seed}", "split": "test",
           "pretrain_seed": unit_seed, "seed": unit_seed, "lam": row.get("lam"), "schedule": row.get("schedule"),
           "descriptors": None if not row.get("descriptors") else
           os.path.splitext(os.path.basename(row["descriptors"]))[0],
           "alpha": alpha, **{k: row.get(k) for k in ("avg", "worst_group", "in_dist", "val_avg", "val_worst_group",
                                                      "val_in_dist")},
           "heldout": None, "selected": selected}
    return {**rec, **extra}


def records_of(seed: int, result: dict) -> list[dict]:
    """``docs/demo.json`` records of one unit's sweep result."""
    out = []
    for r in result["grid"]:
        extra = {"competent": True} if r["method"] == "zero-shot" else {}
        out.append(_record(seed, r["method"], r, selected=bool(r["selected"]), **extra))
    rows = {r["name"]: r for r in result["grid"]}
    for label, curve in result.get("wise", {}).items():
        end = rows["flyp" if label == "flyp" else result["selected"]]
        for p in curve:
            out.append(_record(seed, f"wise-{label}", {**end, **p}, alpha=p["alpha"]))
    return out


def _curve(records, unit, method):
    return sorted((r for r in records if r["unit"] == unit and r["method"] == method), key=lambda r: r["alpha"])


def _setting(r) -> tuple:
    return (r["lam"], r["schedule"], r["descriptors"])


def summarise(records: list[dict]) -> dict:
    """The comparisons over competent units, from the records alone (no test field is used to choose)."""
    units = sorted({r["unit"] for r in records if r["method"] == "zero-shot" and r.get("competent")})
    failed = sorted({r["unit"] for r in records if r["method"] == "zero-shot" and not r.get("competent")})
    get = lambda unit, **m: [r for r in records if r["unit"] == unit and all(r[k] == v for k, v in m.items())]  # noqa: E731
    out = {"units": units, "failed_units": failed}
    if not units:
        return out
    # the demo's default: the setting with the best mean validation worst group over units (ties: val in-dist)
    settings = sorted({_setting(r) for r in records if r["method"] == "starft"}, key=lambda s: (s[0], s[1] or "", s[2] or ""))
    table = []
    for s in settings:
        rows = [r for r in records if r["method"] == "starft" and _setting(r) == s and r["unit"] in units]
        if len({r["unit"] for r in rows}) != len(units):
            continue
        mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
        table.append({"lam": s[0], "schedule": s[1], "descriptors": s[2], **{k: mean(k) for k in (
            "val_worst_group", "val_in_dist", "val_avg", "worst_group", "in_dist", "avg")},
            "times_selected": sum(r["selected"] for r in rows)})
    out["grid"] = table
    pooled = max(table, key=lambda t: (t["val_worst_group"], t["val_in_dist"]))
    out["pooled_choice"] = {k: pooled[k] for k in ("lam", "schedule", "descriptors")}

    def compare(pick) -> dict:
        d_flyp, d_flyp_id, d_wise, clamped = [], [], [], 0
        for u in units:
            s = pick(u)
            flyp = get(u, method="flyp")[0]
            curve = [{"in_dist": p["in_dist"], "worst_group": p["worst_group"]} for p in _curve(records, u, "wise-flyp")]
            matched, was_clamped = matched_worst_group(curve, s["in_dist"])
            clamped += was_clamped
            d_flyp.append((u, s["worst_group"] - flyp["worst_group"]))
            d_flyp_id.append((u, s["in_dist"] - flyp["in_dist"]))
            d_wise.append((u, s["worst_group"] - matched))
        return {"minus_flyp_worst_group": unit_summary(d_flyp), "minus_flyp_in_dist": unit_summary(d_flyp_id),
                "minus_wise_matched_worst_group": unit_summary(d_wise), "clamped": clamped}

    out["selected"] = compare(lambda u: get(u, method="starft", selected=True)[0])
    out["pooled"] = compare(lambda u: next(r for r in get(u, method="starft") if _setting(r) == _setting(
        {**pooled, "descriptors": pooled["descriptors"]})))
    out["starft_minus_zero_shot_worst_group"] = unit_summary(
        [(u, get(u, method="starft", selected=True)[0]["worst_group"] - get(u, method="zero-shot")[0]["worst_group"])
         for u in units])
    out["flyp_minus_zero_shot_worst_group"] = unit_summary(
        [(u, get(u, method="flyp")[0]["worst_group"] - get(u, method="zero-shot")[0]["worst_group"]) for u in units])
    # StarFT + WiSE-FT against WiSE-FT(FLYP): each interior α's point minus the FLYP curve at its in-dist, per unit
    diffs = []
    for u in units:
        flyp_curve = [{"in_dist": p["in_dist"], "worst_group": p["worst_group"]} for p in _curve(records, u, "wise-flyp")]
        for p in _curve(records, u, "wise-starft"):
            if 0 < p["alpha"] < 1:
                diffs.append((u, p["worst_group"] - matched_worst_group(flyp_curve, p["in_dist"])[0]))
    if diffs:
        out["wise_starft_minus_wise_flyp"] = unit_summary(diffs)
    return out


def reading(records: list[dict], summary: dict) -> str:
    """What the headline numbers say, in words decided by the intervals (0 inside or outside)."""
    def side(key, what):
        m, h = summary["selected"][key]["mean"], summary["selected"][key]["ci95"]
        if m - h > 0:
            return f"{what} is above zero ({100 * m:+.1f} ± {100 * h:.1f})"
        if m + h < 0:
            return f"{what} is below zero ({100 * m:+.1f} ± {100 * h:.1f})"
        return f"{what} is not distinguishable from zero ({100 * m:+.1f} ± {100 * h:.1f}, the interval includes 0)"
    units = summary["units"]
    chosen = [next(r for r in records if r["unit"] == u and r["method"] == "starft" and r["selected"]) for u in units]
    top = max(r["lam"] for r in records if r["method"] == "starft")
    zs = statistics.fmean(next(r for r in records if r["unit"] == u and r["method"] == "zero-shot")["val_worst_group"]
                          for u in units)
    text = (side("minus_flyp_worst_group", "StarFT − FLYP in worst group") + "; "
            + side("minus_wise_matched_worst_group", "StarFT − WiSE-FT(FLYP) at matched in-distribution accuracy")
            + ". So on this demo StarFT buys worst-group accuracy at the price of in-distribution accuracy, and "
            "the trade it makes is " + ("better than" if summary["selected"]["minus_wise_matched_worst_group"]["mean"]
                                        - summary["selected"]["minus_wise_matched_worst_group"]["ci95"] > 0 else
                                        "no better than") + " plain weight interpolation of FLYP.")
    zero_best = all(next(r for r in records if r["unit"] == u and r["method"] == "zero-shot")["val_worst_group"]
                    > max(r["val_worst_group"] for r in records if r["unit"] == u and r["method"] in ("flyp", "starft"))
                    for u in units)
    at_edge = sum(r["lam"] == top for r in chosen)
    if at_edge == len(chosen):
        text += f" Every unit chose the grid's largest λ ({top:g}), the edge of the grid"
    elif 2 * at_edge > len(chosen):
        text += f" {at_edge} of {len(chosen)} units chose the grid's largest λ ({top:g}), the edge of the grid"
    else:
        inside = sorted({r["lam"] for r in chosen if r["lam"] != top})
        text += (f" {len(chosen) - at_edge} of {len(chosen)} units chose a λ inside the grid "
                 f"({', '.join(f'{v:g}' for v in inside)}) and {at_edge} its largest ({top:g}).")
    if 2 * at_edge > len(chosen):
        text += (f": validation worst group alone rewards staying close to the zero-shot model, whose validation worst "
                 f"group (mean {100 * zs:.1f} %) is above every fine-tune's in every unit, so a wider grid would "
                 "move the choice, not make it interior." if zero_best else ".")
    return text


def markdown(records: list[dict], summary: dict, meta: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    units = summary["units"]
    lines = ["# The demo's evidence: StarFT settings chosen on validation, and the frontier against WiSE-FT", "",
             f"Made by `python -m studies.demo_study --seeds {meta['seeds']} --lambdas {meta['lambdas']} "
             f"--schedules {meta['schedules']}` ({meta['note']}). Every number below is computed from "
             "`docs/demo.json` (one record per evaluated model) by `studies.demo_study.summarise`.", "",
             "**Data.** Per pre-training seed (one *unit*: its own data draws and zero-shot model), the demo's "
             f"fine-tuning set ({demo_run.FINETUNE_SAMPLES} images, {demo_run.P_SPURIOUS:.0%} of each shape on its own "
             f"background), balanced validation and test sets ({demo_run.EVAL_SAMPLES} images each, every background "
             "equally likely; every part's seed derived from (unit, part), so no two units or parts share an image), and validation / test in-distribution sets (the fine-tuning set's "
             f"group mix, drawn at {demo_run.IN_DIST_IMAGE_SIZE} px so accuracy does not saturate). `avg` and "
             "`worst_group` are test accuracy and worst-group accuracy; `in_dist` is test in-distribution accuracy.",
             "",
             "**Choice.** In each unit `open-clip-starft sweep` picks " + sweep.CRITERION + ". The demo's default "
             "is the setting with the best mean validation worst group over units. The WiSE-FT comparison "
             "interpolates WiSE-FT(FLYP)'s test curve (α 0..1 by 0.1) to the StarFT run's test in-distribution "
             "accuracy (`eval.frontier.matched_worst_group`). Intervals: mean ± half-width of the 95 % Student-t "
             "interval over unit means (runs sharing a pre-trained model are averaged within the unit first); "
             "W/T/L counts units above, within ±1 point of, and below zero.", ""]
    if summary["failed_units"]:
        fails = [r for r in records if r["method"] == "zero-shot" and not r.get("competent")]
        lines += ["**Pre-training failures.** " + "; ".join(
            f"{r['unit']}: zero-shot validation accuracy {pct(r['val_avg'])} %, worst group {pct(r['val_worst_group'])} %"
            for r in fails) + f" (the demo needs {pct(demo_run.COMPETENT['val_avg'])} / "
            f"{pct(demo_run.COMPETENT['val_worst_group'])}): the demo stops for these seeds, and they are left out below.", ""]
    if not units:
        return "\n".join(lines + ["No unit had a competent zero-shot model: nothing to compare."]) + "\n"
    lines += ["## Headline", "", f"{len(units)} units ({', '.join(units)}), points of accuracy:", "",
              "| comparison | per-unit selection (on validation) | demo default "
              f"(λ {summary['pooled_choice']['lam']:g} {summary['pooled_choice']['schedule']}) |", "|---|---|---|"]
    for key, text in (("minus_flyp_worst_group", "StarFT − FLYP, test worst group"),
                      ("minus_flyp_in_dist", "StarFT − FLYP, test in-distribution"),
                      ("minus_wise_matched_worst_group", "StarFT − WiSE-FT(FLYP) at the same in-distribution accuracy, worst group")):
        lines.append(f"| {text} | {fmt(summary['selected'][key])} | {fmt(summary['pooled'][key])} |")
    lines += ["", f"FLYP − zero-shot, test worst group (the damage fine-tuning does): "
              f"{fmt(summary['flyp_minus_zero_shot_worst_group'])}.",
              f"StarFT (selected) − zero-shot, test worst group (what is left of the damage): "
              f"{fmt(summary['starft_minus_zero_shot_worst_group'])}."]
    if "wise_starft_minus_wise_flyp" in summary:
        lines.append(f"StarFT + WiSE-FT (the selected setting's curve, α 0.1..0.9) − WiSE-FT(FLYP) at the same "
                     f"in-distribution accuracy: {fmt(summary['wise_starft_minus_wise_flyp'])}.")
    clamped = summary["selected"]["clamped"] + summary["pooled"]["clamped"]
    if clamped:
        lines.append(f"({clamped} matched comparison(s) fell outside WiSE-FT's in-distribution range and used the "
                     "curve's nearest end.)")
    lines += ["", "**Reading.** " + reading(records, summary), "", "## Per unit", "", "| unit | zero-shot WG / in-dist | FLYP WG / in-dist | selected setting | its val WG | "
              "its test WG / in-dist | WiSE-FT(FLYP) WG at that in-dist |", "|---|---|---|---|---|---|---|"]
    for u in units:
        zs = next(r for r in records if r["unit"] == u and r["method"] == "zero-shot")
        fl = next(r for r in records if r["unit"] == u and r["method"] == "flyp")
        se = next(r for r in records if r["unit"] == u and r["method"] == "starft" and r["selected"])
        curve = [{"in_dist": p["in_dist"], "worst_group": p["worst_group"]} for p in _curve(records, u, "wise-flyp")]
        matched = matched_worst_group(curve, se["in_dist"])[0]
        lines.append(f"| {u} | {pct(zs['worst_group'])} / {pct(zs['in_dist'])} | {pct(fl['worst_group'])} / "
                     f"{pct(fl['in_dist'])} | λ {se['lam']:g} {se['schedule']} | {pct(se['val_worst_group'])} | "
                     f"{pct(se['worst_group'])} / {pct(se['in_dist'])} | {pct(matched)} |")
    lines += ["", "## The whole grid (means over units)", "",
              "| λ | schedule | val WG | val in-dist | test WG | test in-dist | test acc | selected in |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for t in summary["grid"]:
        lines.append(f"| {t['lam']:g} | {t['schedule']} | {pct(t['val_worst_group'])} | {pct(t['val_in_dist'])} | "
                     f"{pct(t['worst_group'])} | {pct(t['in_dist'])} | {pct(t['avg'])} | {t['times_selected']} |")
    lines += ["", "![frontiers](demo.png)", ""]
    return "\n".join(lines) + "\n"


def run(out_root: str, seeds: list[int], lambdas: str, schedules: str, docs: str, note: str = "") -> int:
    records, units = [], {}
    for seed in seeds:
        out = os.path.join(out_root, f"seed{seed}")
        print(f"unit pretrain-seed{seed} in {out}")
        data = demo_run.write_data(os.path.join(out, "data"), seed)
        model = demo_run.pretrain(out, seed, data)
        row, failed = demo_run.zero_shot_check(out, seed, data, model)
        if failed:
            print(f"  {failed}")
            records.append(_record(seed, "zero-shot", row, competent=False))
            continue
        result = sweep.run(sweep.build_parser().parse_args(demo_run.sweep_args(
            out, seed, data, model, lambdas, schedules, WISE_ALPHAS)))
        unit_records = records_of(seed, result)
        records += unit_records
        units[f"pretrain-seed{seed}"] = {
            "curves": {"WiSE-FT(FLYP)": _curve(unit_records, f"pretrain-seed{seed}", "wise-flyp"),
                       "WiSE-FT(selected StarFT)": _curve(unit_records, f"pretrain-seed{seed}", "wise-starft")},
            "points": {"StarFT grid": [r for r in unit_records if r["method"] == "starft"],
                       "FLYP": [r for r in unit_records if r["method"] == "flyp"],
                       "zero-shot": [r for r in unit_records if r["method"] == "zero-shot"]}}
        write_json(records, os.path.join(docs, "demo.json"))  # after every unit: finished work is never lost
    summary = summarise(records)
    write_json(records, os.path.join(docs, "demo.json"))
    if units:
        plot_frontiers(units, os.path.join(docs, "demo.png"), x_label="test in-distribution accuracy (%)",
                       y_label="test worst-group accuracy (%)")
    meta = {"seeds": ",".join(map(str, seeds)), "lambdas": lambdas, "schedules": schedules, "note": note or "CPU"}
    write_text(os.path.join(docs, "demo.md"), markdown(records, summary, meta))
    print(f"records: {os.path.join(docs, 'demo.json')}\nreport:  {os.path.join(docs, 'demo.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studies.demo_study",
                                     description="the study behind the demo's default setting (tens of minutes): "
                                                 "sweep --lambdas × --schedules for every --seeds seed, with WiSE-FT "
                                                 "curves, and write the records and report into --docs")
    parser.add_argument("--out", default="starft-demo", help="folder for data, models, logs and results (default ./starft-demo)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="pre-training seeds, one independent unit each: its own "
                        "data (seeds derived from (unit, part), disjoint between units) and model (default 0,1,2,3,4)")
    parser.add_argument("--lambdas", default="0.5,1,2,4,8,16,32,64,128", help="λ grid, wide enough for an interior "
                        "choice (default 0.5,1,2,4,8,16,32,64,128)")
    parser.add_argument("--schedules", default="linear,staircase,constant", help="schedule grid (default all three)")
    parser.add_argument("--docs", default="docs", help="where demo.json, demo.md and demo.png go (default ./docs)")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise StarftError(f"--seeds {args.seeds!r}: write a comma list of integers, e.g. 0,1,2,3") from None
    return run(os.path.abspath(args.out), seeds, args.lambdas, args.schedules, os.path.abspath(args.docs))
