"""Benchmarks (speed) and the Waterbirds-lite study (accuracy).

- ``cli`` (``open-clip-starft bench step|data|eval``), ``step`` (one training step: FLYP, StarFT, a naive
  port), ``data`` (our training pipeline vs upstream's), ``eval_throughput`` (eval images/s, head cost),
  ``common`` (default device, JSON record files);
- ``stages``: the one subprocess stage runner (``python -m MODULE`` with a console log) and checkpoint
  export, used by ``waterbirds_lite`` and the demo;
- ``waterbirds_lite/``: the accuracy study on real photographs (``open-clip-starft waterbirds-lite``).

May import every subpackage. ``host`` only from ``step`` and only by public names (``host.step.starft_losses``,
``host.batch.Batch``, ``host.teacher.Teacher``, ``host.text_prefix.install_prefix_encoding``), so the step
benchmark times the very step training runs; everything else runs training through
``python -m open_clip_starft.main`` in subprocesses.
"""
