"""The shared training engine of brainage (nnU-Net-like, one engine for every model family).

Entry points: ``brainage-train CONFIG`` / ``python -m training CONFIG`` and, from Python,
:func:`run_training` with a :class:`TrainConfig` from :func:`load_config`.
"""

from .config import TrainConfig, load_config
from .families import ModelFamily, available_families, get_family, register_family
from .run import run_training
from .splits import make_splits
from .trainer import Trainer

# families defined in their own module register themselves when it is imported
from . import diffusion_ae  # noqa: F401

__all__ = ["TrainConfig", "load_config", "run_training", "Trainer", "ModelFamily",
           "register_family", "get_family", "available_families", "make_splits"]
