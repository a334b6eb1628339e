"""The one seam into ``open_clip_train``.

- ``hooks``: the seam, every step of upstream's ``main`` StarFT replaces (``StarftHooks``), passed to it with
  patches/0003 or rebound for the run from one table (``SEAM``) without it
- ``step``: ``StarftStep``, everything StarFT adds per run (teacher, caches, λ, label checks,
  non-finite-loss stop, preemption, per-epoch checks); the one ``star_lambda`` call
- ``state``: ``RunState``, what the hooks learn about a run (class count, what ``--resume`` loaded,
  the settings history), handed to the step and the checkpoint writer by construction
- ``loop``: the generic epoch loop around a step: the one source of the loop patches/0003 adds
- ``teacher``: the frozen zero-shot model (``Teacher.features(batch)``) and its caches
- ``batchnorm``: ``FrozenBatchNormStats``, BatchNorm layers held in eval mode (``--starft-freeze-bn-stats``)
- ``batch``: ``Batch``, one training batch as a named structure
- ``checkpoint``: the one checkpoint writer (``"starft"`` entry, atomic write, ``epoch_E_step_K.pt``),
  ``--resume latest``'s choice and the ``--resume`` reader
- ``runlock``: one training process per run folder
- ``preemption``: SIGUSR1/SIGTERM → a flag the step reads; ``Preempted``
- ``text_prefix``: text towers that stop at a batch's longest caption (exact)
- ``plugin``: the loss entry point and the test for patches/0003

Only this subpackage reaches into ``open_clip_train``'s private names or rebinds its functions.
May import ``method``, ``data`` and ``errors``; imported by ``main`` and by ``bench`` (which times
the step training runs use).
"""
