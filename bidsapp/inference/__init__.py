"""Model inference: which brain-age models are shipped, and running them."""

from .registry import available_models, resolve_models

__all__ = ["available_models", "resolve_models"]
