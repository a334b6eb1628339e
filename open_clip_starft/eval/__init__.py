"""Evaluation: zero-shot accuracy of OpenCLIP checkpoints on eval sets, with the robustness metrics.

- ``evaluator``: ``Evaluator``, the one evaluator every command and training use (heads built once per
  weights, every metric, a set split across processes with the scores gathered);
- ``metrics``: top-1/top-5, per-class, per-group, worst-group and average-group accuracy, ECE, computed
  once (``metrics_of_scores``); the zero-shot heads (``HeadCache``, the one ``build_zero_shot_classifier`` call);
- ``training_validation``: ``--starft-val`` during training (built by ``main``, called by the step);
- ``sets/``: eval sets, one module per layout chosen through a registry (``sets.registry``),
  built-in entries, suite files, batches of images;
- ``models``: checkpoints and run folders (``run_checkpoints``), model creation and weight loading,
  WiSE-FT interpolation, and ``save_local_dir`` (the one ``local-dir:`` / Hub-layout saver);
- ``report``: JSON lines, CLIP_benchmark result files, Markdown tables, plots; ``progress``: progress bars and log lines;
- ``frontier``: worst-group vs in-distribution frontiers (WiSE-FT curves, matched comparisons);
- ``cli`` and ``wise``: the ``eval`` and ``wise`` commands.

May import ``data`` (sample format), ``method`` and ``errors``, and OpenCLIP's public functions;
never ``host``.
"""
