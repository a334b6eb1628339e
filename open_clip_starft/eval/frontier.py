"""Worst-group vs in-distribution frontiers: WiSE-FT curves, matched comparisons, intervals over units.

A *point* is a dict with ``in_dist`` and ``worst_group`` (shares in [0, 1]) and, on a WiSE-FT
curve, ``alpha``. A *curve* is a list of points in α order (θ(α) = (1−α)·θ_zero-shot + α·θ_fine-tuned,
``eval.models.interpolate_state_dicts``), α from 0 (the zero-shot model) to 1 (the fine-tuned one).

The headline comparison asks whether a fine-tune (StarFT) adds anything over plain weight
interpolation: its worst-group accuracy minus the worst-group accuracy WiSE-FT(FLYP) reaches at the
same in-distribution accuracy (``matched_worst_group``). Runs that share a pre-trained model are not
independent, so differences are averaged within a *unit* (one pre-trained model) first; the interval
is a Student-t 95 % interval over the unit means (``unit_summary``), with wins, ties and losses.
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Callable, Sequence

from open_clip_starft.data import files
from open_clip_starft.errors import StarftError
from open_clip_starft.eval.report import _pyplot, save_png


def t975(df: int) -> float:
    """The two-sided 95 % Student-t quantile for ``df ≥ 1`` degrees of freedom (scipy's ``t.ppf``)."""
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % confidence interval (Student t; 0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


TIE = 0.01  # |difference| below one point of accuracy counts as a tie


def matched_worst_group(curve: Sequence[dict], in_dist: float) -> tuple[float, bool]:
    """WiSE-FT's worst-group accuracy at in-distribution accuracy ``in_dist``: ``(value, clamped)``.

    The curve is read as the piecewise-linear path through its points in α order. Where the path
    crosses ``in_dist`` more than once (in-distribution accuracy need not rise monotonically with α),
    the best worst group among the crossings is taken (the comparison favours WiSE-FT). Outside the
    path's in-distribution range the value of the curve's nearest end in in-distribution accuracy is
    taken and ``clamped`` is True."""
    if not curve:
        raise StarftError("an empty WiSE-FT curve: evaluate at least one α")
    crossings = []
    for p, q in zip(curve, curve[1:]):
        lo, hi = sorted((p["in_dist"], q["in_dist"]))
        if not lo <= in_dist <= hi:
            continue
        if hi == lo:
            crossings.append(max(p["worst_group"], q["worst_group"]))
        else:
            t = (in_dist - p["in_dist"]) / (q["in_dist"] - p["in_dist"])
            crossings.append(p["worst_group"] + t * (q["worst_group"] - p["worst_group"]))
    if len(curve) == 1 and curve[0]["in_dist"] == in_dist:
        crossings.append(curve[0]["worst_group"])
    if crossings:
        return max(crossings), False
    end = max(curve, key=lambda p: p["in_dist"]) if in_dist > max(p["in_dist"] for p in curve) \
        else min(curve, key=lambda p: p["in_dist"])
    return end["worst_group"], True


def nearest_point_worst_group(curve: Sequence[dict], in_dist: float) -> float:
    """WiSE-FT's worst-group accuracy at the evaluated point nearest in in-distribution accuracy to ``in_dist``
    (ties: the higher worst group): the estimator that reads no value between two evaluated α."""
    if not curve:
        raise StarftError("an empty WiSE-FT curve: evaluate at least one α")
    return max(curve, key=lambda p: (-abs(p["in_dist"] - in_dist), p["worst_group"]))["worst_group"]


def dominated_by(curve: Sequence[dict], point: dict) -> bool:
    """Whether some point of ``curve`` is at least as good as ``point`` in both in-distribution and worst-group
    accuracy and better in one."""
    return any(p["in_dist"] >= point["in_dist"] and p["worst_group"] >= point["worst_group"]
               and (p["in_dist"] > point["in_dist"] or p["worst_group"] > point["worst_group"]) for p in curve)


def wise_curve(zero_shot: dict, fine_tuned: dict, alphas: Sequence[float],
               evaluate: Callable[[float, dict], dict]) -> list[dict]:
    """Evaluate θ(α) for each α: ``evaluate(alpha, state_dict) -> dict`` of metrics (e.g.
    ``in_dist``, ``worst_group``), returned with ``alpha`` added, in α order."""
    from open_clip_starft.eval.models import interpolate_state_dicts  # torch: imported when a curve is drawn
    return [{"alpha": a, **evaluate(a, interpolate_state_dicts(zero_shot, fine_tuned, a))} for a in sorted(alphas)]


def unit_summary(diffs: Sequence[tuple[str, float]], tie: float = TIE) -> dict:
    """Differences ``(unit, value)`` (several per unit allowed): the per-unit means, their mean and
    the half-width of its 95 % Student-t interval over units, and wins/ties/losses of the unit means
    (a tie: ``|mean| < tie``)."""
    by_unit: dict[str, list[float]] = {}
    for unit, value in diffs:
        by_unit.setdefault(unit, []).append(value)
    if not by_unit:
        raise StarftError("no unit to summarise: every comparison needs at least one run")
    means = {u: sum(v) / len(v) for u, v in by_unit.items()}
    mean, half = mean_ci(list(means.values()))
    return {"per_unit": means, "mean": mean, "ci95": half, "units": len(means),
            "wins": sum(m >= tie for m in means.values()), "ties": sum(abs(m) < tie for m in means.values()),
            "losses": sum(m <= -tie for m in means.values())}


def fmt(summary: dict, scale: float = 100.0) -> str:
    """``+4.2 ± 3.1 (3 units; W/T/L 3/0/0)`` in points."""
    return (f"{scale * summary['mean']:+.1f} ± {scale * summary['ci95']:.1f} ({summary['units']} units; "
            f"W/T/L {summary['wins']}/{summary['ties']}/{summary['losses']})")


def plot_frontiers(units: dict[str, dict], path: str, x_label: str = "in-distribution accuracy (%)",
                   y_label: str = "worst-group accuracy (%)") -> str:
    """One panel per unit: ``units[name]`` holds ``curves`` {label: curve} (lines through the α
    points) and ``points`` {label: [point, ...]} (markers; a point may carry ``selected: True``,
    drawn as a ringed star). Writes a PNG (matplotlib's Agg backend); returns ``path``."""
    plt = _pyplot()
    n = len(units)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"]
    for ax, (name, unit) in zip(axes.flat, units.items()):
        for i, (label, curve) in enumerate(unit.get("curves", {}).items()):
            ax.plot([100 * p["in_dist"] for p in curve], [100 * p["worst_group"] for p in curve], "-o",
                    markersize=3, color=colours[i % len(colours)], label=label)
        for j, (label, points) in enumerate(unit.get("points", {}).items()):
            colour = colours[(j + len(unit.get("curves", {}))) % len(colours)]
            ax.plot([100 * p["in_dist"] for p in points], [100 * p["worst_group"] for p in points], "^",
                    color=colour, markersize=6, label=label)
            for p in points:
                if p.get("selected"):
                    ax.plot([100 * p["in_dist"]], [100 * p["worst_group"]], "*", color="black", markersize=13,
                            markerfacecolor="none", label="selected on validation")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_ylabel(y_label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_json(obj, path: str) -> str:
    """``obj`` as indented JSON at ``path`` (atomically, ``data.files.write_json``); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_json(path, obj)
    return path
