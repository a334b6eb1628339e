"""The one seam into ``open_clip_train``: the hooks that rebind its names, the StarFT train step
(teacher, caches, λ, label checks, preemption), the epoch loop used without patches/0003, and the
entry points patches/0003 loads by name.

Only this subpackage reaches into ``open_clip_train``'s private names or rebinds its functions.
May import ``method``, ``data`` and ``errors``; nothing imports ``host`` but ``main``.
"""
