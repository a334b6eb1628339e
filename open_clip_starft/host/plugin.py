"""StarFT as an OpenCLIP plugin: the names patches/0003 lets open_clip_train load, and a test for that patch.

With ``patches/0003-plugin-hook-losses-and-train-steps.patch`` applied, open_clip_train finds
these through the entry points this package declares (``pyproject.toml``)::

    open_clip_train.losses       starft = open_clip_starft.host.plugin:create_loss
    open_clip_train.train_steps  starft = open_clip_starft.host.step:StarftStep

and ``open_clip_starft.main`` runs upstream's ``main(argv, hooks=StarftHooks(...))`` with
``--loss starft --train-step starft`` (recorded in ``params.txt``): upstream calls the hooks'
methods (``hooks.py``: the StarFT flags, the labelled data, the checkpoint extras, the step built with
the run's ``RunState``) and rebinds nothing. Without the patch ``hooks.py`` binds the same methods
over upstream's names for the run, ``train_one_epoch`` to ``host/loop.py``'s loop around the same
``StarftStep``.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from importlib.metadata import entry_points

import open_clip

from open_clip_starft.method.loss import StarLoss

NAME = "starft"
LOSS_GROUP = "open_clip_train.losses"
STEP_GROUP = "open_clip_train.train_steps"


def host_has_plugin_hook() -> bool:
    """True when the installed open_clip_train carries patches/0003 and sees this package's entry points."""
    if importlib.util.find_spec("open_clip_train.plugins") is None:
        return False
    if not hasattr(importlib.import_module("open_clip_train.plugins"), "Hooks"):
        return False  # an older patches/0003 (entry points only): the hooks are rebound instead
    return all(any(ep.name == NAME for ep in entry_points(group=group)) for group in (LOSS_GROUP, STEP_GROUP))


def create_loss(args) -> StarLoss:
    """``StarLoss`` around upstream's contrastive loss for these flags (``open_clip.create_loss``: ``ClipLoss``,
    or ``SigLipLoss`` with ``--siglip`` and its ``--loss-dist-impl``), with ``--starft-no-mask`` and
    ``--starft-star-form`` (``open_clip_train.losses`` entry point)."""
    if args.world_size > 1 and args.starft_lambda > 0 and not args.gather_with_grad and not args.siglip:
        logging.warning("StarFT under DDP without --gather-with-grad: the Star term's columns from other processes "
                        "carry no gradient (as ClipLoss's); pass --gather-with-grad for the exact global-batch gradient")
    return StarLoss(open_clip.create_loss(args), mask_same_class=not args.starft_no_mask,
                    star_form=args.starft_star_form)
