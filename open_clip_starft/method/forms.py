"""The Star term's forms, by name: ``softmax`` (the paper's KL divergence over each image's row of spurious
captions, for CLIP) and ``sigmoid`` (per image-caption pair, SigLIP's form); ``loss.star_loss`` computes both.

A module of its own (no torch) so that the training command's parser lists them without importing the loss.
"""

STAR_FORMS = ("softmax", "sigmoid")
