"""Evaluation: metrics (top-k, per-group, worst-group, ECE), eval sets by layout, checkpoints and
models, reports and plots, WiSE-FT, and the ``eval``/``wise`` commands.

May import ``data`` (sample format), ``method`` and ``errors``, and OpenCLIP's public functions;
never ``host``.
"""
