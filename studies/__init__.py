"""Accuracy studies: the evidence behind the project's claims, run from a checkout of the repository, never installed.

- ``waterbirds_lite/``: Waterbirds-lite, real photographs and bird cut-outs from Debian's packages, a
  CLIP-lite zero-shot model, FLYP vs StarFT vs WiSE-FT per unit (``python -m studies.waterbirds_lite``);
- ``demo_study``: the study behind the demo's default setting (``python -m studies.demo_study``).

Run from the checkout's root (so that ``studies`` is importable). May import the installed package's public
modules (``open_clip_starft.errors``, ``method``, ``data``, ``eval``, ``tools``, ``demo``); the package never
imports this folder. Training runs in subprocesses through ``open_clip_starft.tools.stages``. Nothing here
installs system packages: a missing Debian package is named in one line with the command that installs it.
"""
