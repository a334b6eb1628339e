"""The released StarFT descriptor sets (``*.txt``), installed as package data of
``open_clip_starft._descriptors``; read them with ``open_clip_starft.descriptors.load_descriptors``."""
