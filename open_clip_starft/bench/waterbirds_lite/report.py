"""The Waterbirds-lite report: tables (analogues of the paper's Tables 3, 4 and 6), a per-group
figure, every run's numbers, and a reading of the paper's claims computed from the records."""
from __future__ import annotations

import math
import statistics

# two-sided 95 % Student t quantiles by degrees of freedom (scipy is not a dependency)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}
METHOD_ORDER = ("zero-shot", "flyp", "starft", "starft-l2", "starft-nomask", "starft-random", "wise-flyp", "wise-starft")


def t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    return _T975[max(k for k in _T975 if k <= df)] if df < 30 else 1.96


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % confidence interval (Student t; 0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def _fmt(values: list[float]) -> str:
    m, h = mean_ci([100 * v for v in values])
    return f"{m:.1f} ± {h:.1f}" if h else f"{m:.1f}"


def _by(records, **match):
    return [r for r in records if all(r[k] == v for k, v in match.items())]


def paired(records: list[dict], protocol: str, a: str, b: str, key: str) -> list[float]:
    """``a − b`` of ``key`` per (split, seed) where both ran."""
    other = {(r["split"], r["seed"]): r[key] for r in _by(records, protocol=protocol, method=b)}
    return [r[key] - other[(r["split"], r["seed"])] for r in _by(records, protocol=protocol, method=a)
            if (r["split"], r["seed"]) in other]


def methods_of(records):
    present = {r["method"] for r in records}
    return [m for m in METHOD_ORDER if m in present]


def main_table(records: list[dict], protocol: str) -> list[str]:
    lines = ["| method | runs | avg (%) | worst group (%) | in-dist (%) | held-out classes (%) | val worst group (%) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in methods_of(records):
        rs = _by(records, protocol=protocol, method=m)
        if rs:
            lines.append(f"| {m} | {len(rs)} | {_fmt([r['avg'] for r in rs])} | {_fmt([r['worst_group'] for r in rs])} | "
                         f"{_fmt([r['in_dist'] for r in rs])} | {_fmt([r['heldout'] for r in rs])} | "
                         f"{_fmt([r['val_worst_group'] for r in rs])} |")
    return lines


def paired_table(records: list[dict], protocol: str) -> list[str]:
    lines = ["| comparison | pairs | Δ avg (points) | Δ worst group (points) | Δ held-out (points) | worst group: wins/ties/losses |",
             "| --- | --- | --- | --- | --- | --- |"]
    for a, b in (("starft", "flyp"), ("starft-l2", "flyp"), ("starft-nomask", "starft"), ("starft-random", "starft"),
                 ("wise-starft", "wise-flyp"), ("flyp", "zero-shot")):
        if b == "zero-shot":
            zs = {r["split"]: r for r in _by(records, protocol=protocol, method="zero-shot")}
            rows = [(r, zs[r["split"]]) for r in _by(records, protocol=protocol, method=a) if r["split"] in zs]
            diffs = {k: [x[k] - y[k] for x, y in rows] for k in ("avg", "worst_group", "heldout")}
        else:
            diffs = {k: paired(records, protocol, a, b, k) for k in ("avg", "worst_group", "heldout")}
        wg = diffs["worst_group"]
        if not wg:
            continue
        wins, ties = sum(d > 1e-9 for d in wg), sum(abs(d) <= 1e-9 for d in wg)
        lines.append(f"| {a} − {b} | {len(wg)} | {_fmt(diffs['avg'])} | {_fmt(wg)} | {_fmt(diffs['heldout'])} | "
                     f"{wins}/{ties}/{len(wg) - wins - ties} |")
    return lines


def runs_table(records: list[dict]) -> list[str]:
    groups = list(records[0]["groups"]) if records else []
    lines = ["| protocol | split | seed | method | avg | worst group | " + " | ".join(groups) +
             " | in-dist | held-out | val avg | val WG | train s |",
             "| " + " | ".join(["---"] * (11 + len(groups))) + " |"]
    for r in sorted(records, key=lambda r: (r["protocol"], r["split"], str(r["seed"]), METHOD_ORDER.index(r["method"]))):
        cells = [r["protocol"], r["split"], "–" if r["seed"] is None else str(r["seed"]), r["method"],
                 f"{100 * r['avg']:.1f}", f"{100 * r['worst_group']:.1f}",
                 *(f"{100 * r['groups'].get(g, float('nan')):.1f}" for g in groups),
                 f"{100 * r['in_dist']:.1f}", f"{100 * r['heldout']:.1f}", f"{100 * r['val_avg']:.1f}",
                 f"{100 * r['val_worst_group']:.1f}",
                 "–" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reading(records: list[dict]) -> list[str]:
    """The paper's claims, each checked on the records: the paired StarFT − FLYP differences."""
    out = []
    for protocol in sorted({r["protocol"] for r in records}):
        d_wg, d_avg, d_ho = (paired(records, protocol, "starft", "flyp", k) for k in ("worst_group", "avg", "heldout"))
        if not d_wg:
            continue

        def verdict(diffs, what):
            m, h = mean_ci([100 * d for d in diffs])
            if m - h > 0:
                word = "higher (the 95 % interval excludes 0)"
            elif m + h < 0:
                word = "lower (the 95 % interval excludes 0)"
            else:
                word = "not distinguishable (the 95 % interval includes 0)"
            return f"{what}: StarFT − FLYP = {m:+.1f} ± {h:.1f} points over {len(diffs)} paired runs: {word}"
        out.append(f"- **{protocol}** — " + verdict(d_wg, "worst-group accuracy") + "; " + verdict(d_avg, "average accuracy")
                   + "; " + verdict(d_ho, "held-out-class accuracy (retained zero-shot)") + ".")
    step0 = [r["star_loss_step0"] for r in records if r["method"].startswith("starft") and r.get("star_loss_step0") is not None]
    if step0:
        out.append(f"- The Star term at step 0 of each of the {len(step0)} StarFT fine-tunes (teacher = student): "
                   f"at most {max(step0):.2g}.")
    return out


def plot_groups(records: list[dict], path: str) -> None:
    """Bars: mean per-group accuracy of each method, one panel per protocol."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    protocols = sorted({r["protocol"] for r in records})
    groups = list(records[0]["groups"])
    fig, axes = plt.subplots(1, len(protocols), figsize=(7 * len(protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        methods = [m for m in methods_of(records) if _by(records, protocol=protocol, method=m)]
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            rs = _by(records, protocol=protocol, method=m)
            means = [100 * statistics.fmean(r["groups"][g] for r in rs) for g in groups]
            ax.bar([i + j * width for i in range(len(groups))], means, width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{protocol}: Waterbirds-lite test, per group (mean over runs)")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(records: list[dict], meta: dict) -> str:
    names = {"P1": "P1 (the paper's protocol): fine-tuned on the source task, zero-shot on Waterbirds-lite",
             "P2": "P2: fine-tuned on the biased Waterbirds-lite train split"}
    lines = ["# Waterbirds-lite: zero-shot vs FLYP vs WiSE-FT vs StarFT on real photographs", "",
             "Generated by `open-clip-starft waterbirds-lite report` from `waterbirds-lite.json`; "
             "every number below is measured by the command in *How it was run*.", ""]
    lines += meta.get("setup", [])
    lines += ["", "## How it was run", "", "```", meta["command"], "```", "",
              "(the calls that made these results, in order; `all` runs the stages build, pretrain, run, report "
              "in one call, and a later call reuses every finished stage and fine-tune)", "",
              f"Wall time: {meta['wall_seconds'] / 60:.1f} min on {meta['machine']} "
              f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in meta['stage_seconds'].items())}).", ""]
    lines += ["## What holds here", "", *reading(records), ""]
    for protocol in sorted({r["protocol"] for r in records}):
        lines += [f"## {names.get(protocol, protocol)}", "",
                  "Mean ± 95 % confidence half-width over runs (splits × training seeds; zero-shot: one per split). "
                  "Test and validation sets are balanced over the four groups, so *avg* weighs every group alike; "
                  "*in-dist* weighs them by the biased train split's shares (Waterbirds' usual average); "
                  "*held-out classes*: zero-shot accuracy on object classes no fine-tune saw (Table 4's analogue).", "",
                  *main_table(records, protocol), "",
                  "Paired differences (same split and training seed; Table 3/6 analogues):", "",
                  *paired_table(records, protocol), ""]
    lines += ["## Per-group accuracy", "", "![per-group accuracy per method](waterbirds-lite.png)", "",
              "## Every run", "", *runs_table(records), ""]
    return "\n".join(lines)
