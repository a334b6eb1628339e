"""λ schedules at the first, middle and last step."""
import pytest

from open_clip_starft.errors import ConfigError
from open_clip_starft.method.schedule import star_lambda

STEPS, EPOCHS = 10, 4  # 40 steps: first 0, middle 20, last 39


@pytest.mark.parametrize("mode,first,middle,last", [
    ("linear", 0.5, 0.25, 0.5 / 40),
    ("staircase", 0.5 * 3 / 4, 0.5 * 1 / 4, 0.0),  # epoch 0, epoch 2, epoch 3 (the last: 0)
    ("constant", 0.5, 0.5, 0.5),
])
def test_schedule_values(mode, first, middle, last):
    got = [star_lambda(mode, 0.5, step, STEPS, EPOCHS) for step in (0, 20, 39)]
    assert got == pytest.approx([first, middle, last], abs=1e-12)


def test_linear_decreases_every_step_and_staircase_per_epoch():
    linear = [star_lambda("linear", 1.0, s, STEPS, EPOCHS) for s in range(40)]
    assert all(a > b for a, b in zip(linear, linear[1:]))
    stairs = [star_lambda("staircase", 1.0, s, STEPS, EPOCHS) for s in range(40)]
    assert len(set(stairs[:10])) == 1 and stairs[9] > stairs[10]


def test_unknown_schedule_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown λ schedule 'cosine': use one of linear, staircase, constant"):
        star_lambda("cosine", 0.5, 0, 1, 1)


def test_registries_refuse_a_second_registration_of_a_name():
    from open_clip_starft.method.captions import SUFFIX_MODES
    from open_clip_starft.method.schedule import SCHEDULES
    for registry, name in ((SCHEDULES, "linear"), (SUFFIX_MODES, "none")):
        before = registry.get(name)
        with pytest.raises(ConfigError, match=f"{name!r} is already registered"):
            registry.add(name, lambda *a: 0.0)
        assert registry.get(name) is before  # nothing was overwritten
