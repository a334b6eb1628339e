"""Accuracy studies: the evidence behind the product's claims, apart from the speed benchmarks (``bench/``).

- ``waterbirds_lite/``: Waterbirds-lite, real photographs and bird cut-outs from Debian's packages, a
  CLIP-lite zero-shot model, FLYP vs StarFT vs WiSE-FT per unit (``open-clip-starft waterbirds-lite``);
- ``demo_study``: the study behind the demo's default setting (``open-clip-starft demo-study``).

May import every lower layer (``errors``, ``method``, ``data``, ``eval``, ``tools``) and ``demo`` (the demo's
data and run); runs training in subprocesses through ``tools.stages``, never through ``host``. Nothing here
installs system packages: a missing Debian package is named in one line with the command that installs it.
"""
