import math

import pytest
import torch

from open_clip_starft.errors import StarftError
from open_clip_starft.eval.frontier import fmt, matched_worst_group, plot_frontiers, unit_summary, wise_curve

CURVE = [  # α 0 → 1: in-dist rises, worst group falls (the usual WiSE-FT shape)
    {"alpha": 0.0, "in_dist": 0.60, "worst_group": 0.80},
    {"alpha": 0.5, "in_dist": 0.80, "worst_group": 0.60},
    {"alpha": 1.0, "in_dist": 0.90, "worst_group": 0.20},
]


def test_matched_worst_group_interpolates_linearly_between_alphas():
    # 0.85 lies halfway between α 0.5 (0.80, 0.60) and α 1 (0.90, 0.20): 0.60 + 0.5 * (0.20 - 0.60) = 0.40
    value, clamped = matched_worst_group(CURVE, 0.85)
    assert value == pytest.approx(0.40) and not clamped
    # 0.65: a quarter of the way from α 0 to α 0.5: 0.80 + 0.25 * (0.60 - 0.80) = 0.75
    assert matched_worst_group(CURVE, 0.65)[0] == pytest.approx(0.75)
    assert matched_worst_group(CURVE, 0.80) == (pytest.approx(0.60), False)  # exactly on a point


def test_matched_worst_group_takes_the_best_crossing_and_clamps_outside():
    # in-dist peaks in the middle: 0.85 is crossed twice, at wg 0.7 (rising part) and 0.3 (falling part)
    curve = [{"in_dist": 0.8, "worst_group": 0.8}, {"in_dist": 0.9, "worst_group": 0.6},
             {"in_dist": 0.8, "worst_group": 0.0}]
    assert matched_worst_group(curve, 0.85) == (pytest.approx(0.7), False)
    assert matched_worst_group(CURVE, 0.95) == (0.20, True)   # above the range: the highest-in-dist end
    assert matched_worst_group(CURVE, 0.50) == (0.80, True)   # below: the lowest-in-dist end
    with pytest.raises(StarftError):
        matched_worst_group([], 0.5)


def test_unit_summary_averages_within_a_unit_before_the_interval():
    # unit a has two runs (0.10 and 0.30 → mean 0.20); b and c one each: unit means 0.20, 0.05, -0.02
    s = unit_summary([("a", 0.10), ("a", 0.30), ("b", 0.05), ("c", -0.02)])
    assert s["per_unit"] == pytest.approx({"a": 0.20, "b": 0.05, "c": -0.02})
    assert s["units"] == 3 and s["mean"] == pytest.approx(0.23 / 3)
    sd = math.sqrt(sum((m - 0.23 / 3) ** 2 for m in (0.20, 0.05, -0.02)) / 2)
    assert s["ci95"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)  # t(0.975, df 2) = 4.302653
    assert (s["wins"], s["ties"], s["losses"]) == (2, 0, 1)  # −2 points is a loss (ties: within ±1 point)
    assert fmt(s).startswith("+7.7 ± ")


def test_unit_summary_ties_and_losses():
    s = unit_summary([("a", 0.005), ("b", -0.2), ("c", -0.004)])
    assert (s["wins"], s["ties"], s["losses"]) == (0, 2, 1)
    with pytest.raises(StarftError):
        unit_summary([])


def test_wise_curve_evaluates_the_interpolated_weights():
    zero, fine = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 0.0])}
    seen = []
    curve = wise_curve(zero, fine, [1.0, 0.0, 0.25], lambda a, sd: seen.append(a) or {"in_dist": float(sd["w"][0])})
    assert [p["alpha"] for p in curve] == [0.0, 0.25, 1.0] == seen
    assert [p["in_dist"] for p in curve] == [0.0, 0.25, 1.0]


def test_plot_frontiers_writes_a_png(tmp_path):
    path = plot_frontiers({"unit a": {"curves": {"WiSE-FT": CURVE},
                                      "points": {"StarFT": [{"in_dist": 0.85, "worst_group": 0.7, "selected": True}]}},
                           "unit b": {"curves": {"WiSE-FT": CURVE}}}, str(tmp_path / "f.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_nearest_point_and_domination():
    from open_clip_starft.eval.frontier import dominated_by, nearest_point_worst_group
    # 0.84: 0.04 from α 0.5 (0.80), 0.06 from α 1 (0.90) → α 0.5's 0.60
    assert nearest_point_worst_group(CURVE, 0.84) == 0.60
    assert nearest_point_worst_group(CURVE, 0.86) == 0.20  # 0.04 from 0.90, 0.06 from 0.80
    assert nearest_point_worst_group(CURVE + [{"in_dist": 0.90, "worst_group": 0.3}], 0.9) == 0.3  # ties: higher WG
    assert dominated_by(CURVE, {"in_dist": 0.80, "worst_group": 0.55})      # α 0.5: same source, better WG
    assert not dominated_by(CURVE, {"in_dist": 0.80, "worst_group": 0.60})  # equal on both: not dominated
    assert not dominated_by(CURVE, {"in_dist": 0.85, "worst_group": 0.50})  # the interpolated line is not a point
    with pytest.raises(StarftError):
        nearest_point_worst_group([], 0.5)
