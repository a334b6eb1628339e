"""Tools around training: ``make_shards`` (image trees and CSVs to webdataset shards), ``descriptors/``
(generate, show, validate and count descriptor sets: ``client``, ``parse``, ``cli``), ``export`` (a
checkpoint as a folder plain OpenCLIP loads), ``sweep`` (StarFT over a grid, chosen on validation),
``stages`` (the one subprocess stage runner) and ``tiny_model`` (the tiny CLIP of the demo, tests and
benchmarks).

May import ``data``, ``method``, ``eval`` and ``errors``; of ``host`` only ``host.params`` (the training
flags' parser, to read a run's settings), never the hooks or the step.
"""
