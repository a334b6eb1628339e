"""Descriptor-set tools behind ``open-clip-starft descriptors``: ``client`` (the language-model HTTP
client), ``parse`` (model answers to ``{}`` templates), ``cli`` (generate, show, validate, stats).

May import ``errors`` and ``method/``; never ``host/`` or ``open_clip_train``.
"""
