"""The one seam into ``open_clip_train``.

- ``hooks``: the names rebound on ``open_clip_train.main`` for one run (``StarftHooks``)
- ``step``: ``StarftStep``, everything StarFT adds per run (teacher, caches, λ, label checks,
  non-finite-loss stop, preemption, per-epoch checks); the one ``star_lambda`` call
- ``loop``: the generic epoch loop around a step, for OpenCLIP without patches/0003
- ``teacher``: the frozen zero-shot model (``Teacher.features(batch)``) and its caches
- ``batch``: ``Batch``, one training batch as a named structure
- ``checkpoint``: the one checkpoint writer (``"starft"`` entry, atomic write, ``epoch_E_step_K.pt``)
- ``preemption``: SIGUSR1/SIGTERM → a flag the step reads; ``Preempted``
- ``text_prefix``: text towers that stop at a batch's longest caption (exact)
- ``plugin``: the loss entry point and the test for patches/0003

Only this subpackage reaches into ``open_clip_train``'s private names or rebinds its functions.
May import ``method``, ``data`` and ``errors``; imported by ``main`` and by ``bench`` (which times
the step training runs use).
"""
