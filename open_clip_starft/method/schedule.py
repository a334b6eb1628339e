"""λ schedules for the Star term, chosen by name.

Each schedule is a pure function ``(base, step, steps_per_epoch, epochs) -> λ`` where ``step``
counts optimizer steps from 0 over the whole run (OpenCLIP's ``step``).

- ``linear`` (default): per step from ``base`` down towards 0 over the run,
  ``base · (1 − step / total_steps)`` (the paper: "linearly decayed during fine-tuning").
- ``staircase``: the official release, per epoch ``base · (1 − (epoch + 1) / epochs)``; never
  the full λ, 0 in the last epoch.
- ``constant``: ``base`` throughout (the "no decay" ablation).
"""
from __future__ import annotations

from typing import Callable

from open_clip_starft.errors import ConfigError
from open_clip_starft.method.registry import Registry

ScheduleFn = Callable[[float, int, int, int], float]
SCHEDULES: Registry[ScheduleFn] = Registry("λ schedule")
register_schedule = SCHEDULES.register


def list_schedules() -> list[str]:
    return SCHEDULES.names()


@register_schedule("linear")
def linear(base: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    total_steps = steps_per_epoch * epochs
    return base * max(0.0, 1.0 - step / total_steps)


@register_schedule("staircase")
def staircase(base: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    epoch = step // steps_per_epoch
    return base * max(0.0, 1.0 - (epoch + 1) / epochs)


@register_schedule("constant")
def constant(base: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    return base


def get_schedule(name: str) -> ScheduleFn:
    return SCHEDULES.get(name)


def star_lambda(name: str, base: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """λ at optimizer step ``step`` (0-based) of a run of ``epochs × steps_per_epoch`` steps."""
    if steps_per_epoch < 1 or epochs < 1:
        raise ConfigError(f"λ schedule needs at least one step and one epoch (got {steps_per_epoch} steps × {epochs} epochs)")
    return get_schedule(name)(base, step, steps_per_epoch, epochs)
