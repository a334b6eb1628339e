"""Tools around training: ``make-shards`` (image trees and CSVs to webdataset shards) and
``descriptors`` (generate, show, validate and count descriptor sets).

May import ``data``, ``method``, ``eval`` and ``errors``; never ``host``.
"""
