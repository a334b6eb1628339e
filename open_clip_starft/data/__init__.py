"""Data: the sample format shared by training, eval and tools (image keys, labels, image decoding,
shard listing and writing) in ``samples``, and the labelled training pipeline in ``training``.

May import ``method`` (captions) and ``errors``, and ``open_clip_train.data``'s public pipeline
stages; never ``host``, ``eval`` or the tools.
"""
