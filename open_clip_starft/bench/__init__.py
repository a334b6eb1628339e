"""Benchmarks: training-step and data-pipeline speed, eval throughput, and the Waterbirds-lite
accuracy study (``waterbirds_lite/``).

May import every subpackage but ``host`` (it runs training through ``open_clip_starft.main`` in
subprocesses, or through ``method`` directly).
"""
