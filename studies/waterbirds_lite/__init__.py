"""Waterbirds-lite: a real-image, CPU-sized test of StarFT (``python -m studies.waterbirds_lite``; ``bench waterbirds-lite`` is an alias).

``build`` composes the data from Debian packages' photographs, ``clip_lite`` makes the zero-shot
model (real MiniLM text tower + small ViT), ``benchmark`` runs the protocols and methods,
``report`` writes the tables; ``cli`` strings them together.
"""
