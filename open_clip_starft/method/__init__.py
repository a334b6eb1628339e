"""The paper's method, with no training host: descriptor sets, clean and spurious captions, the Star
loss and the λ schedules.

Imports torch and open_clip only (of this package: ``errors``); never ``open_clip_train``, so the
method can be read, tested and reused without OpenCLIP's training code.
"""
