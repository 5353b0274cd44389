"""3D DenseNet regressor for brain age (seed 004, Kim et al.).

The network follows the DenseNet-169 description of the seed paper: MONAI's dense blocks and
transition layers, the *last* transition layer removed (the 80 x 120 x 40 input is much smaller
than the 224^3 of the original DenseNet), LeakyReLU (slope 0.01) instead of ReLU, He (Kaiming
normal) initialisation and one scalar output.

Two details are this project's own and do not change the function class:

* the output is ``target_offset + target_scale * linear(features)``, with the two numbers kept
  as buffers (saved with the weights).  Training sets them to the mean and SD of the training
  ages so the loss starts near 1 instead of near ``age**2`` (faster, better-conditioned start).
* activation modules keep MONAI's names (``relu0``, ``relu1`` …) so that
  :class:`monai.visualize.GuidedBackpropGrad`, which finds activations by name, guides them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
# MONAI's own DenseNet building blocks: the seed network is MONAI's DenseNet with one
# transition layer fewer, which MONAI's DenseNet class cannot express.
from monai.networks.nets.densenet import _DenseBlock, _Transition
from torch import nn

from ._checks import check_int, check_net_args
from ._scaling import TargetScaling

__all__ = ["DenseNetRegressor", "densenet169_regressor", "DENSENET169_BLOCKS", "LEAKY_RELU"]

#: Layers per dense block of DenseNet-169.
DENSENET169_BLOCKS = (6, 12, 32, 32)
#: The seed paper's activation: LeakyReLU with negative slope 0.01.
LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class DenseNetRegressor(TargetScaling, nn.Module):
    """DenseNet with a scalar regression head, optionally without its last transition layer.

    Based on `Densely Connected Convolutional Networks <https://arxiv.org/abs/1608.06993>`_ as
    adapted for clinical thick-slice T1w brain age by Kim et al. (seed 004).  3D convolutions on
    CUDA are non-deterministic unless ``torch.use_deterministic_algorithms(True)`` is set.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: input channels.
        out_channels: number of regression outputs (1 for brain age).
        init_features: filters of the first (7^d, stride 2) convolution.
        growth_rate: filters each dense layer adds (k in the DenseNet paper).
        block_config: dense layers per block; ``(6, 12, 32, 32)`` is DenseNet-169.
        bn_size: bottleneck width factor (bn_size * k channels in the 1^d convolution).
        act: activation name or ``(name, kwargs)``; the seed uses LeakyReLU(0.01).
        norm: normalisation name or ``(name, kwargs)`` (``"batch"`` as the seed paper;
            ``"instance"`` makes the output independent of the other samples in a batch).
        dropout_prob: dropout after each dense layer.
        drop_last_transition: remove the transition layer before the last dense block.
        target_offset: added to the scaled output (e.g. mean training age).
        target_scale: multiplies the linear output (e.g. SD of training ages).

    Examples::

        >>> net = DenseNetRegressor(3, 1, 1, init_features=8, growth_rate=4, block_config=(2, 2))
        >>> net(torch.zeros(2, 1, 32, 32, 16)).shape
        torch.Size([2, 1])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 init_features: int = 64, growth_rate: int = 32,
                 block_config: Sequence[int] = DENSENET169_BLOCKS, bn_size: int = 4,
                 act: str | tuple = LEAKY_RELU, norm: str | tuple = "batch",
                 dropout_prob: float = 0.0, drop_last_transition: bool = True,
                 target_offset: float = 0.0, target_scale: float = 1.0) -> None:
        super().__init__()
        check_net_args(spatial_dims, (1, 2, 3), in_channels=in_channels, out_channels=out_channels,
                       init_features=init_features, growth_rate=growth_rate, bn_size=bn_size)
        block_config = tuple(block_config)
        if not block_config:
            raise ValueError("block_config must name at least one dense block")
        for i, layers in enumerate(block_config):
            check_int(f"block_config[{i}]", layers)
        if not 0.0 <= float(dropout_prob) < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob!r}")

        conv = Conv[Conv.CONV, spatial_dims]
        self.features = nn.Sequential(OrderedDict([
            ("conv0", conv(in_channels, init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=init_features)),
            ("relu0", get_act_layer(name=act)),
            ("pool0", Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)),
        ]))
        channels = init_features
        last = len(block_config) - 1
        for i, layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(
                spatial_dims=spatial_dims, layers=layers, in_channels=channels, bn_size=bn_size,
                growth_rate=growth_rate, dropout_prob=float(dropout_prob), act=act, norm=norm))
            channels += layers * growth_rate
            # DenseNet puts a transition between consecutive blocks; the seed drops the last one.
            if i < last and not (drop_last_transition and i == last - 1):
                self.features.add_module(f"transition{i + 1}", _Transition(
                    spatial_dims, in_channels=channels, out_channels=channels // 2, act=act, norm=norm))
                channels //= 2
        self.features.add_module("norm5", get_norm_layer(name=norm, spatial_dims=spatial_dims,
                                                         channels=channels))
        self.class_layers = nn.Sequential(OrderedDict([
            ("relu", get_act_layer(name=act)),
            ("pool", Pool[Pool.ADAPTIVEAVG, spatial_dims](1)),
            ("flatten", nn.Flatten(1)),
            ("out", nn.Linear(channels, out_channels)),
        ]))
        self.register_target_scaling(target_offset, target_scale)
        self.num_features = channels
        self.reset_parameters(act)

    def reset_parameters(self, act: str | tuple = LEAKY_RELU) -> None:
        """He (Kaiming normal) initialisation of convolutions; unit/zero norm and linear bias."""
        slope = 0.0
        if isinstance(act, tuple) and str(act[0]).lower() == "leakyrelu":
            slope = float(act[1].get("negative_slope", 0.01))
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu")
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                     nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Output before the offset/scale (what the training loss compares)."""
        return self.class_layers(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted targets (years for brain age), shape ``(batch, out_channels)``."""
        return self.scaled(self.forward_normalised(x))


def densenet169_regressor(**kwargs) -> DenseNetRegressor:
    """The full-size seed network: 3D DenseNet-169 (growth 32, 64 initial features).

    Keyword arguments override the defaults of :class:`DenseNetRegressor`.
    """
    params = dict(spatial_dims=3, in_channels=1, out_channels=1, init_features=64, growth_rate=32,
                  block_config=DENSENET169_BLOCKS, bn_size=4, act=LEAKY_RELU,
                  drop_last_transition=True)
    params.update(kwargs)
    return DenseNetRegressor(**params)

