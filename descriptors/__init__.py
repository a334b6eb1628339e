"""The released StarFT descriptor sets (``*.txt``), installed as package data of
``open_clip_starft._descriptors``; read them with ``open_clip_starft.method.descriptors.load_descriptors``."""
