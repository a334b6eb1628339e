"""The built-in demo: procedurally drawn shapes on backgrounds (``data``) and the run that pre-trains a
tiny CLIP (``tools.tiny_model``), fine-tunes and evaluates it (``run``, a one-setting ``tools.sweep``). The
study that chose its StarFT setting on validation is ``studies.demo_study``.

May import ``data``, ``eval``, ``method``, ``tools`` (the stage runner, the tiny model, sweep) and ``errors``;
runs training in subprocesses, never through ``host``.
"""
