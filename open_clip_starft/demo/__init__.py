"""The built-in demo: procedurally drawn shapes on backgrounds (``data``), a tiny CLIP (``tiny_model``)
and the run that pre-trains, fine-tunes and evaluates it (``run``).

May import ``data``, ``eval``, ``method`` and ``errors``; runs training in subprocesses, never through ``host``.
"""
