"""StarFT for OpenCLIP: contrastive fine-tuning with spurious textual alignment regularisation."""
from .method.captions import CaptionBuilder, load_classnames, load_templates
from .method.descriptors import load_descriptors
from .errors import StarftError
from .method.loss import StarLoss, star_loss
from .method.schedule import star_lambda

__version__ = "0.1.0"
__all__ = ["CaptionBuilder", "StarLoss", "StarftError", "load_classnames", "load_descriptors",
           "load_templates", "star_lambda", "star_loss"]
