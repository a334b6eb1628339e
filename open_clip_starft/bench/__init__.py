"""Speed benchmarks, nothing else (accuracy studies live in ``studies/``).

- ``cli`` (``open-clip-starft bench step|data|eval``), ``step`` (one training step: FLYP, StarFT, a naive
  port), ``data`` (our training pipeline vs upstream's), ``eval_throughput`` (eval images/s, head cost),
  ``common`` (default device, JSON record files).

May import every lower layer. ``host`` only from ``step`` and only by public names (``host.step.starft_losses``,
``host.batch.Batch``, ``host.teacher.Teacher``, ``host.text_prefix.install_prefix_encoding``), so the step
benchmark times the very step training runs.
"""
