"""Data: the sample format shared by training, eval and tools (image keys, labels, 16-bit-safe
image decoding, the one shard writer and a checked shard reader) in ``samples``; what training
data is checked for (the pre-scan, the counts and the skipped-share rule) in ``checks``; and the
labelled training pipeline (webdataset and CSV, step-exact ``start_from``) in ``training``; the one
checkpoint reader and state-dict normaliser (``module.`` prefixes) in ``weights``.

May import ``method`` (captions) and ``errors``, and ``open_clip_train.data``'s public pipeline
stages; never ``host``, ``eval`` or the tools.
"""
