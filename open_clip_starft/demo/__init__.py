"""The built-in demo: procedurally drawn shapes on backgrounds (``data``), a tiny CLIP (``tiny_model``)
the run that pre-trains, fine-tunes and evaluates it (``run``, a one-setting ``tools.sweep``), and the
study that chose its StarFT setting on validation (``study``: ``docs/demo.json``, ``docs/demo.md``).

May import ``data``, ``eval``, ``method``, ``tools``, ``bench.stages`` (the stage runner) and ``errors``;
runs training in subprocesses, never through ``host``.
"""
