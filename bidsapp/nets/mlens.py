"""Base CNN of the multi-level ensembles (MLens) of seed 002 (Hofmann et al.).

From the input up: five convolution blocks, each a convolution (16, 16, 32, 64, 32 filters;
kernels 3, 3, 3, 3, 1; "same" padding), an activation (LeakyReLU with slope 0.2, or ReLU, the
variant the paper explained with LRP) and a max-pool (3, stride 2, "same" padding: every pool
halves a side, rounding up); then flatten, dropout 0.5 (training only), a dense layer of 64 units
with the same activation and one linear output neuron whose bias is the mean training age.
The same class builds the 2D version used for the torus simulation (``spatial_dims=2``).

Weights use Glorot-uniform initialisation and biases start at zero, as Keras (the paper's
framework) does; only the output bias is set, by :meth:`MLensCNN.set_output_bias`.  There is no
normalisation layer and every activation is a separate, non-inplace module, so the network is
a plain sequence of linear layers, activations and max-pools — what LRP's composite rules expect
(:mod:`bidsapp.explain.lrp`).
"""

from __future__ import annotations

from collections import OrderedDict
from math import prod
from typing import Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer
from torch import nn

from ._checks import check_int, check_net_args

__all__ = ["MLensCNN", "MLENS_FILTERS", "MLENS_KERNELS", "MLENS_LEAKY_RELU", "MLENS_RELU",
           "mlens_feature_shape"]

#: Filters of the five convolution blocks.
MLENS_FILTERS = (16, 16, 32, 64, 32)
#: Kernel side of the five convolutions (3^d, 3^d, 3^d, 3^d, 1^d).
MLENS_KERNELS = (3, 3, 3, 3, 1)
#: The paper's activation of the reported models.
MLENS_LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.2, "inplace": False})
#: The activation of the models the paper explained with LRP.
MLENS_RELU = ("relu", {"inplace": False})


def mlens_feature_shape(in_shape: Sequence[int], n_blocks: int = 5, pool_stride: int = 2) -> tuple[int, ...]:
    """Spatial shape after ``n_blocks`` "same"-padded pools of stride ``pool_stride``.

    Examples
    --------
    >>> mlens_feature_shape((80, 96, 80))
    (3, 3, 3)
    """
    shape = [int(s) for s in in_shape]
    for _ in range(n_blocks):
        shape = [-(-s // pool_stride) for s in shape]  # ceil division: "same" pooling
    return tuple(shape)


class MLensCNN(nn.Module):
    """The MLens base model: 5 conv blocks, dense 64, linear output (seed 002).

    Based on Hofmann et al., "Towards the interpretability of deep learning models for
    multi-modal neuroimaging: finding structural changes of the ageing brain" (NeuroImage 2022).

    Args:
        spatial_dims: 2 (torus simulation) or 3 (MRI).
        in_channels: input channels.
        out_channels: regression outputs (1 for brain age).
        in_shape: spatial input shape; fixes the width of the dense layer.
        filters: filters of the convolution blocks.
        kernel_sizes: kernel side of each convolution (odd; "same" padding).
        act: activation name or ``(name, kwargs)``: :data:`MLENS_LEAKY_RELU` (paper) or
            :data:`MLENS_RELU` (the LRP models).  In-place activations are refused because
            they break the backward hooks of LRP.
        pool_size: max-pool window side.
        pool_stride: max-pool stride.
        dropout: dropout rate after flattening (active in training mode only).
        dense_units: width of the hidden dense layer.
        output_bias: initial bias of the output neuron (the mean training age).

    Examples::

        >>> net = MLensCNN(3, in_shape=(40, 48, 40)).eval()
        >>> net(torch.zeros(2, 1, 40, 48, 40)).shape
        torch.Size([2, 1])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 in_shape: Sequence[int] = (80, 96, 80),
                 filters: Sequence[int] = MLENS_FILTERS, kernel_sizes: Sequence[int] = MLENS_KERNELS,
                 act: str | tuple = MLENS_LEAKY_RELU, pool_size: int = 3, pool_stride: int = 2,
                 dropout: float = 0.5, dense_units: int = 64, output_bias: float = 0.0) -> None:
        super().__init__()
        check_net_args(spatial_dims, in_channels=in_channels, out_channels=out_channels,
                       pool_size=pool_size, pool_stride=pool_stride, dense_units=dense_units)
        in_shape = tuple(check_int(f"in_shape[{i}]", s) for i, s in enumerate(in_shape))
        if len(in_shape) != spatial_dims:
            raise ValueError(f"in_shape must have {spatial_dims} sides, got {in_shape}")
        filters, kernel_sizes = tuple(filters), tuple(kernel_sizes)
        if not filters or len(filters) != len(kernel_sizes):
            raise ValueError(f"filters and kernel_sizes must be non-empty and of equal length, "
                             f"got {filters} and {kernel_sizes}")
        for i, (f, k) in enumerate(zip(filters, kernel_sizes)):
            check_int(f"filters[{i}]", f)
            if check_int(f"kernel_sizes[{i}]", k) % 2 == 0:
                raise ValueError(f"kernel_sizes[{i}] must be odd ('same' padding), got {k}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if pool_size % 2 == 0:
            raise ValueError(f"pool_size must be odd ('same' padding), got {pool_size}")
        probe = get_act_layer(name=act)
        if getattr(probe, "inplace", False):
            raise ValueError("act must not be in-place (LRP hooks need the activation inputs)")

        self.spatial_dims = spatial_dims
        self.in_shape = in_shape
        conv, pool = Conv[Conv.CONV, spatial_dims], Pool[Pool.MAX, spatial_dims]
        layers: list[tuple[str, nn.Module]] = []
        channels = in_channels
        for i, (f, k) in enumerate(zip(filters, kernel_sizes)):
            layers += [(f"conv{i}", conv(channels, f, kernel_size=k, padding=k // 2)),
                       (f"act{i}", get_act_layer(name=act)),
                       (f"pool{i}", pool(kernel_size=pool_size, stride=pool_stride,
                                         padding=pool_size // 2))]
            channels = f
        self.features = nn.Sequential(OrderedDict(layers))
        self.feature_shape = mlens_feature_shape(in_shape, len(filters), pool_stride)
        self.num_features = channels * prod(self.feature_shape)
        self.head = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten(1)),
            ("dropout", nn.Dropout(float(dropout))),
            ("dense", nn.Linear(self.num_features, dense_units)),
            ("act", get_act_layer(name=act)),
            ("out", nn.Linear(dense_units, out_channels)),
        ]))
        self.reset_parameters()
        self.set_output_bias(output_bias)

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases (Keras defaults, as the paper)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def output_layer(self) -> nn.Linear:
        """The linear output neuron(s)."""
        return self.head.out

    def set_output_bias(self, value: float) -> None:
        """Set the output bias (the paper: the mean age of the training data)."""
        with torch.no_grad():
            self.head.out.bias.fill_(float(value))

    def set_target_scaling(self, offset: float, scale: float) -> None:
        """Training-engine hook: the output bias becomes ``offset`` (the mean training age).

        ``scale`` is not used: the paper trains on the plain MSE in years², and the network
        has no output scale (so that LRP's relevance sums to prediction minus output bias).
        """
        self.set_output_bias(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ages, shape ``(batch, out_channels)``."""
        return self.head(self.features(x))
