"""Layer-wise Relevance Propagation (LRP) of regression networks with zennit.

The composite follows iNNvestigate's ``LRPSequentialPresetA`` that seed 002 (Hofmann et al.)
used: the epsilon rule on dense layers and alpha1-beta0 on convolutions; activations pass
relevance through unchanged and max-pools send it to the winning input (plain gradient).  The
first layer gets the flat rule by default (what the issue asks for; in iNNvestigate that is
``LRPSequentialPresetAFlat`` — plain ``PresetA`` keeps alpha1-beta0 there, available as
``first_rule="alpha1beta0"``).  Flat lets zero-valued inputs (atrophied tissue, CSF) receive
relevance, which alpha1-beta0 on the raw input cannot give them.  Propagation starts at the single regression output
with the relevance ``prediction - output bias``: for a network whose output bias is the mean
training age, the evidence for an age above (positive) or below (negative) that mean.

Biases take no share of the relevance in any rule (zennit's ``zero_params=["bias"]``): each
layer then passes on exactly the relevance it received (up to the tiny stabilisers), so the
relevance map sums to ``prediction - output bias`` — the conservation the paper's
``p = b_t + sum(r)`` states.  With biases as relevance sinks, the sum would drift away from
that by the share the hidden biases absorb (the paper calls the sum a "proxy").

zennit is installed without its dependencies (``pip install --no-deps zennit``, see setup.cfg):
it declares torchvision, which would replace this project's CPU torch.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["import_zennit", "mlens_composite", "lrp_relevance", "lrp_ensemble", "LRP_RULES"]

#: Which rule the composite applies where (for model cards and reports).
LRP_RULES = {"first layer": "flat", "convolutions": "alpha1-beta0", "dense layers": "epsilon",
             "activations": "pass", "max-pool": "winner takes all (gradient)",
             "biases": "absorb no relevance", "start": "prediction - output bias"}


def import_zennit():
    """Import zennit, also where torchvision is not installed.

    ``zennit/__init__.py`` imports ``zennit.torchvision`` (canonizers for torchvision's VGG and
    ResNet classes), which imports torchvision.  This project never uses those canonizers and
    installs zennit with ``--no-deps`` so that pip keeps its CPU torch; when torchvision is
    missing, an empty module is registered as ``zennit.torchvision`` before the import, so the
    package loads.  Nothing else of zennit is touched.

    Returns
    -------
    module
        The ``zennit`` package.

    Raises
    ------
    ImportError
        When zennit is not installed (with the install command).
    """
    if "zennit" in sys.modules:
        return sys.modules["zennit"]
    if importlib.util.find_spec("zennit") is None:
        raise ImportError("LRP relevance maps need zennit: pip install --no-deps 'zennit==0.5.1' "
                          "(--no-deps keeps pip from replacing torch through torchvision)")
    if importlib.util.find_spec("torchvision") is None and "zennit.torchvision" not in sys.modules:
        placeholder = types.ModuleType("zennit.torchvision")
        placeholder.__doc__ = ("Placeholder registered by bidsapp.explain.lrp: torchvision is not "
                               "installed, so zennit's torchvision canonizers are unavailable.")
        sys.modules["zennit.torchvision"] = placeholder
    import zennit

    return zennit


def mlens_composite(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, first_rule: str = "flat"):
    """The LRPSequentialPresetA-equivalent composite (see the module docstring).

    Parameters
    ----------
    first_rule : {"flat", "alpha1beta0"}
        Rule of the first layer.
    epsilon : float
        Stabiliser of the epsilon rule on dense layers.  Kept small: a large epsilon absorbs
        relevance and breaks conservation.
    stabilizer : float
        Stabiliser of the flat and alpha-beta rules.

    Returns
    -------
    zennit.composites.SpecialFirstLayerMapComposite
    """
    import_zennit()
    from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta, Epsilon, Flat
    from zennit.types import Convolution, Linear

    if not epsilon > 0 or not stabilizer > 0:
        raise ValueError(f"epsilon and stabilizer must be > 0, got {epsilon!r}, {stabilizer!r}")
    no_bias = ["bias"]
    layer_map = layer_map_base(stabilizer) + [
        (Convolution, AlphaBeta(alpha=1.0, beta=0.0, stabilizer=stabilizer, zero_params=no_bias)),
        (nn.Linear, Epsilon(epsilon=epsilon, zero_params=no_bias)),
    ]
    if first_rule == "flat":
        first = Flat(stabilizer=stabilizer, zero_params=no_bias)
    elif first_rule == "alpha1beta0":
        first = AlphaBeta(alpha=1.0, beta=0.0, stabilizer=stabilizer, zero_params=no_bias)
    else:
        raise ValueError(f"first_rule must be 'flat' or 'alpha1beta0', got {first_rule!r}")
    first_map = [(Linear, first)]
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map)


def _output_bias(network: nn.Module) -> torch.Tensor:
    layer = getattr(network, "output_layer", None)
    if not isinstance(layer, nn.Linear):
        raise TypeError("network must expose its last linear layer as `output_layer` "
                        "(e.g. bidsapp.nets.MLensCNN)")
    if layer.out_features != 1:
        raise ValueError(f"LRP starts at a single regression output; the network has "
                         f"{layer.out_features}")
    return layer.bias.detach() if layer.bias is not None else torch.zeros(1)


def lrp_relevance(network: nn.Module, x: torch.Tensor | np.ndarray, *,
                  device: str | torch.device = "cpu", epsilon: float = 1e-6,
                  stabilizer: float = 1e-6, first_rule: str = "flat") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relevance of every input voxel for the regression output of ``network``.

    Parameters
    ----------
    network : nn.Module
        A regression network with one output and ``output_layer`` (e.g.
        :class:`~bidsapp.nets.MLensCNN`); evaluated in eval mode (dropout off).
    x : tensor or ndarray
        Inputs ``(B, C, *spatial)``, or one input ``(C, *spatial)`` / ``spatial``.
    device : str or torch.device
    epsilon, stabilizer : float
        See :func:`mlens_composite`.

    Returns
    -------
    relevance : ndarray, shape ``(B, *spatial)``
        Summed over channels; ``relevance[b].sum() == prediction[b] - bias`` up to the stabilisers.
    prediction : ndarray, shape ``(B,)``
    bias : ndarray, shape ``(1,)``
        The output bias the relevance is measured against.
    """
    import_zennit()
    from zennit.attribution import Gradient

    tensor = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
    spatial = getattr(network, "spatial_dims", tensor.ndim - 2)
    while tensor.ndim < spatial + 2:
        tensor = tensor[None]
    tensor = tensor.detach().float().to(device).clone()
    bias = _output_bias(network).to(device)
    was_training = network.training
    network.eval()
    try:
        composite = mlens_composite(epsilon=epsilon, stabilizer=stabilizer, first_rule=first_rule)
        with Gradient(model=network, composite=composite) as attributor:
            output, relevance = attributor(tensor, lambda out: out - bias)
    finally:
        network.train(was_training)
    return (relevance.detach().sum(dim=1).cpu().numpy(), output.detach()[:, 0].cpu().numpy(),
            bias.cpu().numpy())


def lrp_ensemble(networks: Sequence[nn.Module], x: torch.Tensor | np.ndarray, *,
                 device: str | torch.device = "cpu", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Mean LRP relevance over base models (the paper averages the maps of an ensemble).

    Parameters
    ----------
    networks : sequence of nn.Module
    x : tensor or ndarray
        One input (see :func:`lrp_relevance`).
    device : str or torch.device
    **kwargs
        Passed to :func:`lrp_relevance`.

    Returns
    -------
    relevance : ndarray
        Mean map, spatial shape of ``x``.
    evidence : ndarray, shape ``(n_networks,)``
        ``prediction - output bias`` of each network (what each map sums to).
    """
    if not networks:
        raise ValueError("lrp_ensemble needs at least one network")
    total, evidence = None, []
    for net in networks:
        rel, pred, bias = lrp_relevance(net, x, device=device, **kwargs)
        total = rel[0] if total is None else total + rel[0]
        evidence.append(float(pred[0] - bias[0]))
    return total / len(networks), np.asarray(evidence)
