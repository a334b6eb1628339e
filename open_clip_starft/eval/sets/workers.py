"""How many data-loader workers eval uses by default: the CPUs this process may run on, at most 4.

A module of its own (no torch) so that the commands' parsers show the default without importing the data
loader.
"""
from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as torch's DataLoader counts them; else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(cap: int = 4) -> int:
    """Data-loader workers by default: the CPUs this process has, at most ``cap`` (more than it has makes
    torch warn and only adds processes)."""
    return min(cap, available_cpus())
