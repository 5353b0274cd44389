"""Explanations of model predictions (guided backpropagation, LRP with zennit).

:mod:`bidsapp.explain.torus` is the documented LRP check on simulated ageing tori (seed 002).
"""

from .guided_backprop import guided_backprop, map_to_grid, warp_to_template
from .lrp import LRP_RULES, import_zennit, lrp_ensemble, lrp_relevance, mlens_composite

__all__ = ["guided_backprop", "map_to_grid", "warp_to_template", "lrp_relevance", "lrp_ensemble",
           "mlens_composite", "import_zennit", "LRP_RULES"]
