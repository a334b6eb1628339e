"""StarFT for OpenCLIP: contrastive fine-tuning with spurious textual alignment regularisation."""
from .captions import CaptionBuilder, load_classnames, load_templates
from .descriptors import load_descriptors
from .errors import StarftError
from .loss import StarLoss, star_loss
from .schedule import star_lambda

__version__ = "0.1.0"
__all__ = ["CaptionBuilder", "StarLoss", "StarftError", "load_classnames", "load_descriptors",
           "load_templates", "star_lambda", "star_loss"]
