"""Explanations of model predictions (guided backpropagation)."""

from .guided_backprop import guided_backprop, map_to_grid, warp_to_template

__all__ = ["guided_backprop", "map_to_grid", "warp_to_template"]
