"""Voxel-level brain-age U-Net of seed 000 (Popescu et al., local brain age).

A fully convolutional U-Net on blocks of the Jacobian-modulated GM and WM maps in MNI space:

* every convolution is a 3^d kernel *without padding* ("valid"), stride 1, followed by
  LeakyReLU (slope 0.2) and a squeeze-and-excitation unit (MONAI's ``ChannelSELayer``);
* ``convs_per_scale`` (2) convolutions per scale; ``init_channels`` (64) doubling per level;
  2^d average pooling down, 2^d transposed convolutions (stride 2) up, and the encoder features
  centre-cropped to the decoder's size for the skip connections (Ronneberger et al.);
* one voxelwise age output (1^d convolution) for the central block: with the paper's
  ``depth = 2`` an input block of 52^3 voxels gives 12^3 output voxels (see
  :func:`local_unet_sizes`);
* auxiliary block-level age heads at the coarser scales (global average pooling + dense; the
  bottleneck and each decoder level but the finest: two heads for ``depth = 2``), used only in
  training (eq. 5 of the paper).

Three details are this project's own: the outputs are ``target_offset + target_scale * raw``
(buffers saved with the weights; training sets them to the mean and SD of the training ages);
the output convolution starts at zero, so an untrained network predicts the mean age
everywhere; and, with ``input_shape`` given, the network carries voxelwise input statistics
(``input_mean``, ``input_std`` buffers over the whole brain box, set by training to the mean
and SD of each channel at each voxel over the training scans) and :meth:`LocalUNet.standardize`
turns a prepared input into voxelwise z-scores *before* it is cut into blocks.  A block's
content then says how this brain differs from the training population at those positions
instead of where in the brain the block lies, which is what a small network trained on a
hundred scans on a CPU can learn in a few hundred steps (see the reduced configuration).
Dropout (after each scale's convolutions, off in the paper) exists for Monte-Carlo dropout at
inference (:func:`enable_mc_dropout`).

Note that the squeeze-and-excitation units average over the whole block, so an output voxel
depends on the entire input block through the channel weights; the convolutional receptive field
proper is computed by :func:`local_unet_sizes`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.networks.blocks import ChannelSELayer
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer
from torch import nn

from ._checks import check_int, check_net_args
from ._scaling import TargetScaling

__all__ = ["LocalUNet", "local_unet_sizes", "local_unet_input_size", "enable_mc_dropout",
           "LOCAL_UNET_ACT"]

#: The paper's activation: LeakyReLU with slope 0.2.
LOCAL_UNET_ACT = ("leakyrelu", {"negative_slope": 0.2, "inplace": False})


def local_unet_sizes(in_size: int, depth: int = 2, convs_per_scale: int = 2) -> dict[str, Any]:
    """Block sides through the U-Net for a cubic input block of side ``in_size``.

    Each valid 3-convolution removes 2 voxels, pooling halves, upsampling doubles; the output
    side is ``in_size - 2 c (3 * 2**depth - 2)`` (``c`` = convolutions per scale): 52 -> 12
    for the paper's ``depth = 2, c = 2``.

    Parameters
    ----------
    in_size : int
        Side of the input block (voxels).
    depth : int
        Number of poolings (scales below the finest).
    convs_per_scale : int

    Returns
    -------
    dict
        ``encoder`` (side after each encoder level's convolutions), ``bottom``, ``decoder``
        (side after each decoder level's convolutions, coarse to fine), ``output`` and
        ``margin`` (input voxels on each side of the output block, ``(in - out) / 2``).

    Raises
    ------
    ValueError
        When a pooling meets an odd side, a skip connection cannot be centre-cropped, or a
        side drops below 1.

    Examples
    --------
    >>> local_unet_sizes(52)
    {'encoder': [48, 20], 'bottom': 6, 'decoder': [8, 12], 'output': 12, 'margin': 20}
    """
    check_int("in_size", in_size)
    check_int("depth", depth, 0)
    check_int("convs_per_scale", convs_per_scale)
    shrink = 2 * convs_per_scale
    side, encoder = in_size, []
    for level in range(depth):
        side -= shrink
        if side < 2 or side % 2:
            raise ValueError(f"input block {in_size}: encoder level {level} has side {side} "
                             "before pooling (must be even and >= 2)")
        encoder.append(side)
        side //= 2
    side -= shrink
    if side < 1:
        raise ValueError(f"input block {in_size} is too small for depth {depth}")
    bottom, decoder = side, []
    for level in reversed(range(depth)):
        side *= 2
        if (encoder[level] - side) % 2 or encoder[level] < side:
            raise ValueError(f"input block {in_size}: the skip of level {level} ({encoder[level]}) "
                             f"cannot be centre-cropped to {side}")
        side -= shrink
        if side < 1:
            raise ValueError(f"input block {in_size} is too small for depth {depth}")
        decoder.append(side)
    return {"encoder": encoder, "bottom": bottom, "decoder": decoder, "output": side,
            "margin": (in_size - side) // 2}


def local_unet_input_size(out_size: int, depth: int = 2, convs_per_scale: int = 2) -> int:
    """Input block side that yields an output block of side ``out_size``.

    Examples
    --------
    >>> local_unet_input_size(12)
    52
    """
    check_int("out_size", out_size)
    in_size = out_size + 2 * convs_per_scale * (3 * 2 ** depth - 2)
    local_unet_sizes(in_size, depth, convs_per_scale)  # raises if the geometry is invalid
    return in_size


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    start = (x.shape[2] - size) // 2
    index = (slice(None), slice(None)) + (slice(start, start + size),) * (x.ndim - 2)
    return x[index]


class _ConvSE(nn.Sequential):
    """Valid 3^d convolution, activation, squeeze-and-excitation."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act, se: bool,
                 se_reduction: int) -> None:
        super().__init__()
        self.add_module("conv", Conv[Conv.CONV, spatial_dims](in_channels, out_channels,
                                                              kernel_size=3, padding=0))
        self.add_module("act", get_act_layer(name=act))
        if se:
            hidden = max(1, out_channels // se_reduction)
            self.add_module("se", ChannelSELayer(spatial_dims, out_channels,
                                                 r=out_channels // hidden))


class _Scale(nn.Sequential):
    """The convolutions of one scale, then dropout."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, convs: int, act,
                 se: bool, se_reduction: int, dropout: float) -> None:
        super().__init__()
        for i in range(convs):
            channels = in_channels if i == 0 else out_channels
            self.add_module(f"conv{i}", _ConvSE(spatial_dims, channels, out_channels, act, se,
                                                se_reduction))
        self.add_module("dropout", nn.Dropout(float(dropout)))


class LocalUNet(TargetScaling, nn.Module):
    """U-Net predicting voxelwise brain age for the central block of its input (seed 000).

    Based on Popescu et al., "Local brain-age: a U-Net model" (Front. Aging Neurosci. 2021),
    after Ronneberger et al., `U-Net <https://arxiv.org/abs/1505.04597>`_, with Hu et al.'s
    squeeze-and-excitation units.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input maps (2: modulated GM and WM).
        out_channels: voxelwise outputs (1: brain age).
        init_channels: channels of the finest scale (paper: 64), doubled per level.
        depth: poolings (paper: 2, i.e. three scales).
        convs_per_scale: valid 3^d convolutions per scale (paper: 2).
        act: activation name or ``(name, kwargs)`` (paper: LeakyReLU 0.2).
        se: squeeze-and-excitation after every convolution (paper: yes).
        se_reduction: channel reduction of the excitation (hidden units = channels // r, >= 1;
            16 as Hu et al.).
        dropout: dropout rate after each scale's convolutions (0 in the paper; > 0 for
            Monte-Carlo dropout).
        target_offset, target_scale: outputs are ``offset + scale * raw``.
        input_shape: ``(in_channels, X, Y, Z)`` of the prepared input (the brain box) to carry
            voxelwise input statistics for :meth:`standardize` (``None``: raw input).

    Examples::

        >>> net = LocalUNet(init_channels=4).eval()
        >>> voxel, aux = net(torch.zeros(1, 2, 52, 52, 52), return_aux=True)
        >>> tuple(voxel.shape), [tuple(a.shape) for a in aux]
        ((1, 1, 12, 12, 12), [(1, 1), (1, 1)])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, out_channels: int = 1,
                 init_channels: int = 64, depth: int = 2, convs_per_scale: int = 2,
                 act: str | tuple = LOCAL_UNET_ACT, se: bool = True, se_reduction: int = 16,
                 dropout: float = 0.0, target_offset: float = 0.0,
                 target_scale: float = 1.0, input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        check_net_args(spatial_dims, in_channels=in_channels, out_channels=out_channels,
                       init_channels=init_channels, convs_per_scale=convs_per_scale,
                       se_reduction=se_reduction)
        check_int("depth", depth, 1)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.spatial_dims, self.depth, self.convs_per_scale = spatial_dims, depth, convs_per_scale
        widths = [init_channels * 2 ** level for level in range(depth + 1)]
        common = dict(spatial_dims=spatial_dims, convs=convs_per_scale, act=act, se=se,
                      se_reduction=se_reduction, dropout=dropout)
        self.encoder = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            self.encoder.append(_Scale(in_channels=channels, out_channels=widths[level], **common))
            channels = widths[level]
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2)
        self.bottom = _Scale(in_channels=channels, out_channels=widths[depth], **common)
        # decoder levels listed coarse to fine: index i works at level depth - 1 - i
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        conv_t = Conv[Conv.CONVTRANS, spatial_dims]
        for level in reversed(range(depth)):
            self.up.append(conv_t(widths[level + 1], widths[level], kernel_size=2, stride=2))
            self.decoder.append(_Scale(in_channels=2 * widths[level], out_channels=widths[level],
                                       **common))
        self.output = Conv[Conv.CONV, spatial_dims](widths[0], out_channels, kernel_size=1)
        # block-level heads on the bottleneck and every decoder level but the finest
        pool = Pool[Pool.ADAPTIVEAVG, spatial_dims]
        self.aux_heads = nn.ModuleList(
            nn.Sequential(pool(1), nn.Flatten(1), nn.Linear(w, out_channels))
            for w in [widths[depth]] + [widths[level] for level in reversed(range(1, depth))])
        self.register_target_scaling(target_offset, target_scale)
        self.input_shape = None
        if input_shape is not None:
            shape = tuple(int(n) for n in input_shape)
            if len(shape) != spatial_dims + 1 or shape[0] != in_channels or min(shape) < 1:
                raise ValueError(f"input_shape must be (in_channels={in_channels}, "
                                 f"{spatial_dims} spatial sides), got {tuple(input_shape)}")
            self.input_shape = shape
            self.register_buffer("input_mean", torch.zeros(shape))
            self.register_buffer("input_std", torch.ones(shape))
        self.reset_parameters(act)

    def set_input_statistics(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Set the voxelwise input mean and SD used by :meth:`standardize` (SD must be > 0)."""
        if self.input_shape is None:
            raise ValueError("this network was built without input_shape: it has no input "
                             "statistics")
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if mean.shape != self.input_shape or std.shape != self.input_shape:
            raise ValueError(f"input statistics must have shape {self.input_shape}, got "
                             f"{mean.shape} and {std.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(std > 0) and np.all(np.isfinite(std))):
            raise ValueError("input statistics must be finite with SD > 0")
        with torch.no_grad():
            self.input_mean.copy_(torch.from_numpy(mean))
            self.input_std.copy_(torch.from_numpy(std))

    def standardize(self, data: np.ndarray) -> np.ndarray:
        """Voxelwise z-scores ``(data - input_mean) / input_std`` of a whole prepared input.

        Identity (as float32) for a network without input statistics.  Blocks are cut from the
        result, so the zero padding beyond the box means "the training mean".
        """
        data = np.asarray(data, dtype=np.float32)
        if self.input_shape is None:
            return data
        if data.shape != self.input_shape:
            raise ValueError(f"input of shape {data.shape} does not match the network's input "
                             f"statistics {self.input_shape} (another grid or brain box)")
        mean = self.input_mean.detach().float().cpu().numpy()
        std = self.input_std.detach().float().cpu().numpy()
        return ((data - mean) / std).astype(np.float32)

    def reset_parameters(self, act: str | tuple = LOCAL_UNET_ACT) -> None:
        """He initialisation for the activation's slope, zero biases, zero output convolution.

        Each squeeze-and-excitation unit starts as the constant gate sigmoid(0) = 1/2 (its
        output layer at zero, so that random block statistics do not modulate the channels
        before anything is learnt); as that would halve the signal at every convolution (1/1000
        after ten) and there is no normalisation layer to undo it, the convolutions followed by
        a gate start with twice the He weights: the untrained network passes its input on at
        the same scale.
        """
        slope = float(act[1].get("negative_slope", 0.0)) if isinstance(act, tuple) else 0.0
        for name, module in self.named_modules():
            if ".se." in f".{name}.":
                continue  # the excitation keeps MONAI's own initialisation
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                                   nn.Linear)):
                nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, _ConvSE) and hasattr(module, "se"):
                    module.conv.weight.mul_(2.0)
                    excite = [m for m in module.se.fc.modules() if isinstance(m, nn.Linear)][-1]
                    nn.init.zeros_(excite.weight)
                    nn.init.zeros_(excite.bias)
        nn.init.zeros_(self.output.weight)

    def sizes(self, in_size: int) -> dict[str, Any]:
        """:func:`local_unet_sizes` for this network's depth."""
        return local_unet_sizes(in_size, self.depth, self.convs_per_scale)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """Voxelwise ages of the central block, ``(batch, out_channels, o, o, o)`` (years).

        With ``return_aux`` also the list of block-level ages ``(batch, out_channels)`` of the
        auxiliary heads, coarsest first.
        """
        skips = []
        for scale in self.encoder:
            x = scale(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        aux = [x] if return_aux else []
        for i, (up, scale) in enumerate(zip(self.up, self.decoder)):
            x = up(x)
            x = scale(torch.cat([_centre_crop(skips[-1 - i], x.shape[2]), x], dim=1))
            if return_aux and i < self.depth - 1:
                aux.append(x)
        voxel = self.scaled(self.output(x))
        if not return_aux:
            return voxel
        return voxel, [self.scaled(head(f))
                       for head, f in zip(self.aux_heads, aux)]


def enable_mc_dropout(net: nn.Module) -> int:
    """Put ``net`` in eval mode with its dropout layers active (Monte-Carlo dropout).

    Returns
    -------
    int
        Number of dropout layers with a non-zero rate (0: sampling gives identical outputs).
    """
    net.eval()
    active = 0
    for module in net.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()
            active += int(module.p > 0)
    return active
