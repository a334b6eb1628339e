"""The Waterbirds-lite report (v2): the zero-shot models' competence, the validation-chosen StarFT against FLYP
and against WiSE-FT(FLYP) at the same in-distribution accuracy (intervals over units), the whole grid, the
two-class property (Star term with and without the mask, class margin per background), and every run.

Statistics: a difference is taken per (unit, training seed), averaged within the unit, and summarised over units
(``eval.frontier.unit_summary``: Student-t 95 % interval over unit means, wins/ties/losses); runs sharing a
pre-trained model are never counted as independent."""
from __future__ import annotations

import statistics

from studies.waterbirds_lite.build import WB_GROUP_NAMES
from open_clip_starft.eval.frontier import (dominated_by, fmt, matched_worst_group, mean_ci, nearest_point_worst_group,
                                            plot_frontiers, unit_summary)

VARIANT_NAMES = {"shared": "shared species, background photographs split (v3's headline)",
                 "identity": "identity (species held out, stricter)",
                 "crops": "crops (species and background photographs in every part, new crops; secondary)",
                 "transfer": "transfer (the paper's protocol: source species fine-tuned, target species zero-shot)"}
PROTOCOL_NAMES = {"P1": "P1 (the paper's protocol): fine-tuned on the multi-class source task, zero-shot on Waterbirds-lite",
                  "P2": "P2 (secondary): fine-tuned on the biased two-class Waterbirds-lite train split"}


def _by(records, **match):
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def setting_label(r: dict) -> str:
    """``flyp``, ``starft λ2 constant background``, with `` α0.3`` for a WiSE-FT point."""
    if r["method"] == "zero-shot":
        return "zero-shot"
    base = "flyp" if not r["lam"] else f"starft λ{r['lam']:g} {r['schedule']} {r['descriptors']}"
    return base if r["alpha"] is None else f"wise({base}) α{r['alpha']:g}"


def runs(records: list[dict], protocol: str, variant: str | None = None) -> dict:
    """``{(unit, seed): {"zero-shot", "flyp", "selected", "grid": [...], "wise-flyp": curve, "wise-starft": curve}}``
    of one protocol (and variant); a curve runs from the zero-shot point (α 0) to the fine-tune (α 1)."""
    out = {}
    for r in records:
        if r["protocol"] != protocol or (variant is not None and r["variant"] != variant) or r["seed"] is None:
            continue
        run = out.setdefault((r["unit"], r["seed"]), {"grid": [], "wise-flyp": [], "wise-starft": []})
        if r["alpha"] is not None:
            run[r["method"]].append(r)
        else:
            run["grid"].append(r)
            if r["method"] == "flyp":
                run["flyp"] = r
            if r.get("selected"):
                run["selected"] = r
    zs = {r["unit"]: r for r in _by(records, protocol=protocol, method="zero-shot")}
    for (unit, _), run in out.items():
        run["zero-shot"] = zs[unit]
        for key, end in (("wise-flyp", run.get("flyp")), ("wise-starft", run.get("selected"))):
            run[key] = [zs[unit], *sorted(run[key], key=lambda p: p["alpha"]), *([end] if end else [])]
    return out


def headline(records: list[dict], protocol: str, variant: str | None) -> dict:
    """``{comparison: unit_summary}`` (shares, not points): FLYP − zero-shot (the premise); (a) StarFT at the paper's
    default (``PAPER_SETTINGS``: the background set, and the scenes' phrases, where the grid ran them) − FLYP and
    − WiSE-FT(FLYP) at its in-distribution accuracy (linear interpolation and nearest α point); (b) the
    validation-selected StarFT − FLYP (worst group, in-dist, held-out, avg) and − zero-shot; (c) the selected StarFT
    − WiSE-FT(FLYP) by both estimators."""
    diffs: dict[str, list] = {}
    dominated: dict[str, list] = {}
    clamped = 0
    for (unit, _), run in runs(records, protocol, variant).items():
        if "flyp" not in run:
            continue
        flyp, zs = run["flyp"], run["zero-shot"]
        diffs.setdefault("FLYP − zero-shot: worst group", []).append((unit, flyp["worst_group"] - zs["worst_group"]))
        diffs.setdefault("FLYP − zero-shot: in-dist", []).append((unit, flyp["in_dist"] - zs["in_dist"]))
        for setting, name in PAPER_SETTINGS.items():  # reading (a): the paper's own setting, never chosen by anything
            paper = next((r for r in run["grid"] if (r["lam"], r["schedule"], r["descriptors"]) == setting), None)
            if paper is None:
                continue
            for key, what in (("worst_group", "worst group"), ("in_dist", "in-dist")):
                diffs.setdefault(f"{name} − FLYP: {what}", []).append((unit, paper[key] - flyp[key]))
            diffs.setdefault(f"{name} − WiSE-FT(FLYP) at its in-dist: worst group", []).append(
                (unit, paper["worst_group"] - matched_worst_group(run["wise-flyp"], paper["in_dist"])[0]))
            diffs.setdefault(f"{name} − WiSE-FT(FLYP), nearest evaluated α point: worst group", []).append(
                (unit, paper["worst_group"] - nearest_point_worst_group(run["wise-flyp"], paper["in_dist"])))
        if "selected" not in run:
            continue
        sel = run["selected"]
        for key, what in (("worst_group", "worst group"), ("in_dist", "in-dist"), ("avg", "avg"), ("heldout", "held-out")):
            diffs.setdefault(f"StarFT (selected) − FLYP: {what}", []).append((unit, sel[key] - flyp[key]))
        for key, what in (("worst_group", "worst group"), ("in_dist", "in-dist")):
            diffs.setdefault(f"StarFT (selected) − zero-shot: {what}", []).append((unit, sel[key] - zs[key]))
        matched, was_clamped = matched_worst_group(run["wise-flyp"], sel["in_dist"])
        clamped += was_clamped
        diffs.setdefault("StarFT (selected) − WiSE-FT(FLYP) at its in-dist: worst group", []).append(
            (unit, sel["worst_group"] - matched))
        diffs.setdefault(NEAREST, []).append((unit, sel["worst_group"] - nearest_point_worst_group(run["wise-flyp"],
                                                                                               sel["in_dist"])))
        dominated.setdefault(unit, []).append(dominated_by(run["wise-flyp"], sel))
    out = {k: unit_summary(v) for k, v in diffs.items()}
    out["_clamped"] = clamped
    out["_dominated"] = {"runs": sum(sum(v) for v in dominated.values()), "of": sum(len(v) for v in dominated.values())}
    return out


NEAREST = "StarFT (selected) − WiSE-FT(FLYP), nearest evaluated α point: worst group"
PAPER_SETTING = (0.5, "linear", "background")  # the paper's default: λ 0.5 decayed linearly, its background set
PAPER = "StarFT at the paper's default (λ 0.5 linear, background)"
PAPER_SCENES = "StarFT at the paper's λ 0.5 linear with the scenes' own phrases"
PAPER_SETTINGS = {PAPER_SETTING: PAPER, (0.5, "linear", "scenes"): PAPER_SCENES}


def _pct(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m, h = mean_ci([100 * v for v in values])
    return f"{m:.1f} ± {h:.1f}" if h else f"{m:.1f}"


def zero_shot_table(records: list[dict]) -> list[str]:
    lines = ["| unit | val avg (%) | val worst group (%) | test avg (%) | test worst group (%) | held-out (%) | "
             "margin on land | margin on water |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(_by(records, protocol=records[0]["protocol"], method="zero-shot"), key=lambda r: r["unit"]):
        m = r.get("margin_by_background", {})
        lines.append(f"| {r['unit']} | {100 * r['val_avg']:.1f} | {100 * r['val_worst_group']:.1f} | {100 * r['avg']:.1f} | "
                     f"{100 * r['worst_group']:.1f} | {100 * r['heldout']:.1f} | {m.get('land', float('nan')):.2f} | "
                     f"{m.get('water', float('nan')):.2f} |")
    return lines


def headline_lines(records: list[dict], protocol: str) -> list[str]:
    lines = ["| split variant | comparison | mean ± 95 % interval over units (points) |", "| --- | --- | --- |"]
    for variant in [v for v in VARIANT_NAMES if _by(records, protocol=protocol, variant=v)]:
        summary = headline(records, protocol, variant)
        clamped, dominated = summary.pop("_clamped"), summary.pop("_dominated")
        for name, s in summary.items():
            lines.append(f"| {variant} | {name} | {fmt(s)} |")
        lines.append(f"| {variant} | runs whose chosen StarFT some WiSE-FT(FLYP) point dominates (better or equal in "
                     f"both worst group and in-dist) | {dominated['runs']} of {dominated['of']} |")
        if clamped:
            lines.append(f"| {variant} | (matched values clamped to the WiSE-FT curve's end) | {clamped} runs |")
    return lines


def _verdict(summary: dict) -> str:
    lo, hi = summary["mean"] - summary["ci95"], summary["mean"] + summary["ci95"]
    if summary["units"] < 2:
        return "one unit: no interval"
    return "above 0 (the interval excludes 0)" if lo > 0 else "below 0 (the interval excludes 0)" if hi < 0 else \
        "not distinguishable from 0 (the interval includes 0)"


READING = ("FLYP − zero-shot: worst group", f"{PAPER} − FLYP: worst group",
           f"{PAPER} − WiSE-FT(FLYP) at its in-dist: worst group", f"{PAPER_SCENES} − FLYP: worst group",
           "StarFT (selected) − zero-shot: worst group",
           "StarFT (selected) − FLYP: worst group", "StarFT (selected) − FLYP: in-dist",
           "StarFT (selected) − WiSE-FT(FLYP) at its in-dist: worst group", NEAREST)


def reading_lines(records: list[dict], protocol: str) -> list[str]:
    """One sentence per headline comparison and variant, read off its interval (nothing else is claimed)."""
    lines = []
    for variant in [v for v in VARIANT_NAMES if _by(records, protocol=protocol, variant=v)]:
        summary = headline(records, protocol, variant)
        for name in READING:
            if name in summary:
                lines.append(f"- {variant}, {name}: {fmt(summary[name])} points, {_verdict(summary[name])}.")
    return lines


def grid_table(records: list[dict], protocol: str) -> list[str]:
    """Each setting's validation and test numbers (means over units) and how often validation chose it."""
    lines = ["| setting | runs | val worst group (%) | val in-dist (%) | test worst group (%) | test in-dist (%) | "
             "held-out (%) | chosen |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    grid = [r for r in records if r["protocol"] == protocol and r["alpha"] is None and r["method"] != "zero-shot"]
    for label in dict.fromkeys(setting_label(r) for r in grid):
        rs = [r for r in grid if setting_label(r) == label]
        lines.append(f"| {label} | {len(rs)} | {_pct(r['val_worst_group'] for r in rs)} | "
                     f"{_pct(r['val_in_dist'] for r in rs)} | {_pct(r['worst_group'] for r in rs)} | "
                     f"{_pct(r['in_dist'] for r in rs)} | {_pct(r['heldout'] for r in rs)} | "
                     f"{sum(bool(r['selected']) for r in rs)} |")
    return lines


def two_class_table(records: list[dict], protocol: str) -> list[str]:
    """Star term (masked, unmasked) of each model against its zero-shot teacher on test, and the class margin
    t·(x·y_true − x·y_other) per group (means over runs)."""
    lines = ["| model | runs | Star term, masked | Star term, no mask | " + " | ".join(f"margin: {g}" for g in WB_GROUP_NAMES)
             + " |", "| " + " | ".join(["---"] * (4 + len(WB_GROUP_NAMES))) + " |"]
    picks = {"zero-shot": _by(records, protocol=protocol, method="zero-shot"),
             "flyp": [run["flyp"] for run in runs(records, protocol).values() if "flyp" in run],
             "StarFT (selected)": [run["selected"] for run in runs(records, protocol).values() if "selected" in run]}
    for name, rs in picks.items():
        rs = [r for r in rs if "star_masked" in r]
        if not rs:
            continue
        mean = lambda xs: statistics.fmean(xs)  # noqa: E731
        lines.append(f"| {name} | {len(rs)} | {mean(r['star_masked'] for r in rs):.4f} | "
                     f"{mean(r['star_unmasked'] for r in rs):.4f} | "
                     + " | ".join(f"{mean(r['margin'][g] for r in rs):+.2f}" for g in WB_GROUP_NAMES) + " |")
    return lines


def runs_table(records: list[dict]) -> list[str]:
    lines = ["| protocol | unit | seed | setting | epochs | selected | avg | worst group | "
             + " | ".join(WB_GROUP_NAMES) + " | in-dist | held-out | val avg | val WG | train s |",
             "| " + " | ".join(["---"] * (14 + len(WB_GROUP_NAMES) - 4 + 0)) + " |"]
    for r in records:
        if r["alpha"] is not None:
            continue
        cells = [r["protocol"], r["unit"], "–" if r["seed"] is None else str(r["seed"]), setting_label(r),
                 "–" if r.get("epochs") is None else str(r["epochs"]), "yes" if r["selected"] else "",
                 f"{100 * r['avg']:.1f}", f"{100 * r['worst_group']:.1f}",
                 *(f"{100 * r['groups'].get(g, float('nan')):.1f}" for g in WB_GROUP_NAMES),
                 f"{100 * r['in_dist']:.1f}", f"{100 * r['heldout']:.1f}", f"{100 * r['val_avg']:.1f}",
                 f"{100 * r['val_worst_group']:.1f}",
                 "–" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines[1] = "| " + " | ".join(["---"] * (len(lines[0].split("|")) - 2)) + " |"
    return lines


def plot(records: list[dict], path: str) -> str:
    """The frontiers (``eval.frontier.plot_frontiers``): per protocol and unit (first training seed), WiSE-FT's
    curves from the zero-shot model to FLYP and to the chosen StarFT, and the StarFT grid's points."""
    panels = {}
    for protocol in sorted({r["protocol"] for r in records}):
        for (unit, seed), run in sorted(runs(records, protocol).items()):
            if any(k[0] == unit for k in panels if k[1] == protocol) or "flyp" not in run:
                continue
            points = [dict(p, selected=bool(p["selected"])) for p in run["grid"] if p["lam"]]
            curves = {"WiSE-FT(FLYP)": run["wise-flyp"]}
            if len(run["wise-starft"]) > 2:  # evaluated α points beyond its two ends (Schedule.wise_of_selected)
                curves["WiSE-FT(StarFT)"] = run["wise-starft"]
            panels[(unit, protocol)] = {"curves": curves,
                                        "points": {"StarFT grid": points}}
    return plot_frontiers({f"{p} {u}": v for (u, p), v in panels.items()}, path)


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"# Waterbirds-lite {meta.get('title', '')}: zero-shot vs FLYP vs WiSE-FT vs StarFT on real photographs", "",
             "Generated by `python -m studies.waterbirds_lite report` from `waterbirds-lite.json`; "
             "every number below is measured by the command in *How it was run*.", ""]
    lines += meta.get("setup", [])
    lines += ["", "## How it was run", "", "```", meta["command"], "```", "",
              "(the calls that made these results, in order; `all` runs the stages build, pretrain, run, report "
              "in one call, and a later call reuses every finished stage and fine-tune)", "",
              f"Stage times on {meta['machine']}, summed over the calls (calls that ran at the same time, or beside "
              f"other work, each count their own wall time): {meta['wall_seconds'] / 60:.1f} min "
              f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in meta['stage_seconds'].items())}).", "",
              "## The zero-shot models (one per unit)", "",
              "Competence is checked on validation (the issue's bar: val avg ≥ 75 %); margins are the zero-shot "
              "class margin on test, mean over the images on each background.", "", *zero_shot_table(records), ""]
    for protocol in sorted({r["protocol"] for r in records}):
        lines += [f"## {PROTOCOL_NAMES.get(protocol, protocol)}", "",
                  "Differences per (unit, training seed), averaged within a unit, mean ± 95 % Student-t interval over "
                  "units, W/T/L of the unit means (a tie: under 1 point). The StarFT setting is chosen per unit and seed "
                  "on Waterbirds-lite VALIDATION worst group (ties: validation in-distribution accuracy); in-dist is "
                  + ("source-test accuracy (the multi-class task fine-tuned on)." if protocol == "P1" else
                     "Waterbirds-lite test weighted by the biased train split's group shares."), "",
                  *headline_lines(records, protocol), "", "Read off the intervals:", "", *reading_lines(records, protocol),
                  "", "The whole grid (means over runs):", "",
                  *grid_table(records, protocol), "",
                  "The two-class property on test: the Star term of each model against its zero-shot teacher with and "
                  "without the same-class mask, and the class margin per group:", "",
                  *two_class_table(records, protocol), ""]
    lines += ["## Frontiers", "", "![worst group vs in-distribution accuracy](waterbirds-lite.png)", "",
              "## Every run (WiSE-FT points are in the JSON records)", "", *runs_table(records), ""]
    return "\n".join(lines)


def gate_markdown(record: dict) -> str:
    """The gate record (``cli._gate``) as Markdown: per unit and training seed, the zero-shot model and P1's FLYP
    on Waterbirds-lite validation (target species) and source-val, and the verdict, read plainly."""
    schedule, sizes = record["schedule"], record["sizes"]
    lines = [f"# Waterbirds-lite gate: does fine-tuning damage the zero-shot model? ({record['title']})", "",
             "Generated from `gate.json` beside this file by `python -m studies.waterbirds_lite gate`; VALIDATION "
             "only (no test set was read). P1: FLYP fine-tuned on the source task (source species and objects, "
             f"{100 * sizes['p_aligned']:.0f} % of source birds on their own place), lr {schedule['finetune_lr']:g}, "
             f"{' or '.join(map(str, schedule['p1_epochs']))} epochs chosen on source-val accuracy; Waterbirds-lite "
             f"validation: {sizes['wb_val']} images of TARGET species (never in a fine-tune), balanced over the four "
             f"groups; source-val {sizes['source_val']} images. Machine: {record['machine']}, shared with other work.",
             "", "| unit | seed | zero-shot val worst group (%) | FLYP val worst group (%) | FLYP − zero-shot (points) "
             "| zero-shot val avg (%) | FLYP val avg (%) | source-val zero-shot → FLYP (%) | FLYP epochs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for unit, entry in sorted(record["units"].items()):
        zs = entry["zero_shot"]
        for seed, run in sorted(entry["seeds"].items()):
            flyp = run["flyp"][str(run["chosen_epochs"])]
            lines.append(f"| {unit} | {seed} | {100 * zs['val_worst_group']:.1f} | {100 * flyp['val_worst_group']:.1f} "
                         f"| {100 * run['flyp_minus_zero_shot_val_worst_group']:+.1f} | {100 * zs['val_avg']:.1f} "
                         f"| {100 * flyp['val_avg']:.1f} | {100 * zs['source_val']:.1f} → {100 * flyp['source_val']:.1f} "
                         f"| {run['chosen_epochs']} |")
    lines += ["", "Validation groups (zero-shot → FLYP at the chosen length, %):", ""]
    for unit, entry in sorted(record["units"].items()):
        for seed, run in sorted(entry["seeds"].items()):
            flyp = run["flyp"][str(run["chosen_epochs"])]
            groups = ", ".join(f"{g} {100 * a:.1f} → {100 * flyp['val_groups'][g]:.1f}"
                               for g, a in entry["zero_shot"]["val_groups"].items())
            lines.append(f"- {unit} seed {seed}: {groups}")
    damaged = sorted(u for u, e in record["units"].items() if e["damage"])
    lines += ["", "Verdict: " + (f"FLYP lowers the zero-shot validation worst group in {len(damaged)} of "
                                 f"{len(record['units'])} unit(s) ({', '.join(damaged)}): the gate passes, the study "
                                 "may run." if damaged else
                                 f"FLYP does not lower the zero-shot validation worst group in any of the "
                                 f"{len(record['units'])} unit(s): with this recipe there is no damage for StarFT to "
                                 "prevent, and the gate does not pass."),
              "", "## How it was run", "", "```", record["command"], "```", ""]
    return "\n".join(lines)
