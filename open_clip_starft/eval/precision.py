"""The precisions ``eval`` scores at: autocast over fp32 weights, as upstream's evaluation does.

A module of its own (no torch) so that the commands' parsers can offer them as choices without importing
the model code.
"""

EVAL_PRECISIONS = ("fp32", "amp", "amp_bf16")
"""The ``--precision`` values of ``eval`` and ``wise`` (and a training run's own, ``models.run_precision``)."""
