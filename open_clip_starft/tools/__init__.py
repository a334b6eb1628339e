"""Tools around training: ``make_shards`` (image trees and CSVs to webdataset shards), ``descriptors/``
(generate, show, validate and count descriptor sets: ``client``, ``parse``, ``cli``), ``export`` (a
checkpoint as a folder plain OpenCLIP loads) and ``sweep`` (StarFT over a grid, chosen on validation).

May import ``data``, ``method``, ``eval``, ``bench`` and ``errors``; never ``host``.
"""
