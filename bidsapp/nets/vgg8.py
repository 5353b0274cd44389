"""VGG8 brain-age regressor of seed 003 (Jomsky et al., T1w + AI-synthesised CBV).

The paper's encoder is five blocks of 3D convolution (3^3, "same" padding), batch norm, ReLU
and 2^3 max-pooling with 16, 32, 64, 128 and 256 filters; the flattened encoder output goes
through dense layers of 512 and 128 units to one output.  One network is trained per input
(T1w, or the synthetic CBV map); ``in_channels = 2`` gives a network that sees both at once.

Each block is MONAI's :class:`~monai.networks.blocks.Convolution` (conv, norm, activation)
followed by a max-pool; the block's ``conv`` sub-module is the layer Grad-CAM explains
(:attr:`VGG8.gradcam_layer`, the output of the last convolution block before its pooling).

As in the other networks of this package the output is ``target_offset + target_scale *
head(features)``, with both numbers kept as buffers; training sets them to the mean and SD of
the training ages so the L1 loss starts near 1 (the function class is unchanged).
"""

from __future__ import annotations

from collections import OrderedDict
from math import prod
from typing import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from monai.networks.layers.utils import get_act_layer
from torch import nn

from ._checks import check_int, check_net_args
from ._scaling import TargetScaling

__all__ = ["VGG8", "VGG8_CHANNELS", "VGG8_DENSE", "vgg8_feature_shape"]

#: Filters of the five convolution blocks.
VGG8_CHANNELS = (16, 32, 64, 128, 256)
#: Widths of the hidden dense layers.
VGG8_DENSE = (512, 128)


def vgg8_feature_shape(in_shape: Sequence[int], n_blocks: int = len(VGG8_CHANNELS)) -> tuple[int, ...]:
    """Spatial shape after ``n_blocks`` 2^d max-pools (each halves a side, rounding down).

    Examples
    --------
    >>> vgg8_feature_shape((80, 96, 80))
    (2, 3, 2)
    >>> vgg8_feature_shape((40, 48, 40))
    (1, 1, 1)
    """
    return tuple(int(s) // 2 ** n_blocks for s in in_shape)


class VGG8(TargetScaling, nn.Module):
    """Five conv-BN-ReLU-max-pool blocks, dense 512 -> 128 -> 1 (seed 003).

    Based on Jomsky et al., "Integrating AI-synthesised cerebral blood volume with T1w MRI for
    brain age estimation" (VGG8 after Feng et al., Neurobiol. Aging 2020).

    Args:
        spatial_dims: 2 or 3.
        in_channels: 1 (T1w or CBV alone) or 2 (T1w and CBV as channels).
        out_channels: regression outputs (1 for brain age).
        in_shape: spatial input shape; fixes the width of the first dense layer.  Every side
            must be at least ``2 ** len(channels)``.
        channels: filters of the convolution blocks.
        dense_units: widths of the hidden dense layers.
        dropout: dropout after each hidden dense layer (the paper: none).
        act: activation name or ``(name, kwargs)``.
        norm: normalisation name or ``(name, kwargs)``.
        target_offset: added to the scaled output (mean training age).
        target_scale: multiplies the head's output (SD of the training ages).

    Examples::

        >>> net = VGG8(3, in_shape=(32, 32, 32), channels=(2, 2, 2, 2, 2), dense_units=(4, 4)).eval()
        >>> net(torch.zeros(2, 1, 32, 32, 32)).shape
        torch.Size([2, 1])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 in_shape: Sequence[int] = (80, 96, 80), channels: Sequence[int] = VGG8_CHANNELS,
                 dense_units: Sequence[int] = VGG8_DENSE, dropout: float = 0.0,
                 act: str | tuple = "relu", norm: str | tuple = "batch",
                 target_offset: float = 0.0, target_scale: float = 1.0) -> None:
        super().__init__()
        check_net_args(spatial_dims, in_channels=in_channels, out_channels=out_channels)
        channels, dense_units = tuple(channels), tuple(dense_units)
        if not channels:
            raise ValueError("channels must name at least one convolution block")
        for i, c in enumerate(channels):
            check_int(f"channels[{i}]", c)
        for i, d in enumerate(dense_units):
            check_int(f"dense_units[{i}]", d)
        in_shape = tuple(check_int(f"in_shape[{i}]", s) for i, s in enumerate(in_shape))
        if len(in_shape) != spatial_dims:
            raise ValueError(f"in_shape must have {spatial_dims} sides, got {in_shape}")
        smallest = 2 ** len(channels)
        if min(in_shape) < smallest:
            raise ValueError(f"every side of in_shape must be >= {smallest} ({len(channels)} "
                             f"max-pools of 2), got {in_shape}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        self.spatial_dims, self.in_shape, self.channels = spatial_dims, in_shape, channels
        pool = Pool[Pool.MAX, spatial_dims]
        blocks: list[tuple[str, nn.Module]] = []
        previous = in_channels
        for i, c in enumerate(channels):
            blocks.append((f"block{i}", nn.Sequential(OrderedDict([
                # MONAI computes "same" padding (1 for 3^d); "NA": conv -> norm -> activation
                ("conv", Convolution(spatial_dims, previous, c, kernel_size=3, act=act, norm=norm,
                                     adn_ordering="NA")),
                ("pool", pool(kernel_size=2, stride=2)),
            ]))))
            previous = c
        self.features = nn.Sequential(OrderedDict(blocks))
        self.feature_shape = vgg8_feature_shape(in_shape, len(channels))
        self.num_features = previous * prod(self.feature_shape)
        head: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten(1))]
        width = self.num_features
        for i, units in enumerate(dense_units):
            head += [(f"dense{i}", nn.Linear(width, units)), (f"act{i}", get_act_layer(name=act)),
                     (f"drop{i}", nn.Dropout(float(dropout)))]
            width = units
        head.append(("out", nn.Linear(width, out_channels)))
        self.head = nn.Sequential(OrderedDict(head))
        self.register_target_scaling(target_offset, target_scale)

    @property
    def gradcam_layer(self) -> str:
        """Name of the last convolution block's conv-BN-ReLU (before its pool), for Grad-CAM."""
        return f"features.block{len(self.channels) - 1}.conv"

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Output before the offset/scale."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ages, shape ``(batch, out_channels)``."""
        return self.scaled(self.forward_normalised(x))
