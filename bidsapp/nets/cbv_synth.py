"""CBV synthesis network of seed 003 (Jomsky et al., AICBV): T1w -> cerebral blood volume.

The seed paper feeds a VGG8 brain-age model with cerebral blood volume (CBV) maps synthesised
from the T1w by a "3D patch-based hybrid CNN-Mamba model" (their ref. 12): a 3D CNN encoder and
decoder with skip connections around a bottleneck of state-space blocks whose selective scans
run over the bottleneck voxels along several paths, and a one-channel output.  It was trained on
paired T1w / steady-state gadolinium CBV scans.  This module is a plain-PyTorch rendering of
that description:

* :func:`selective_scan`: the S6 recurrence ``h_t = exp(delta_t A) h_{t-1} + Bbar_t u_t``,
  ``y_t = C_t h_t + D u_t``, with a diagonal, negative real ``A`` and exact zero-order-hold
  discretisation, evaluated in chunks (closed form inside a chunk, recurrence across chunks);
* :class:`SelectiveSSM`: the Mamba-style mixer on a token sequence: causal depthwise
  convolution, SiLU, input-dependent ``delta`` (softplus), ``B`` and ``C`` projections,
  ``A = -exp(A_log)``;
* :class:`StateSpaceBlock`: pre-LayerNorm, an input projection split into a signal and a gate,
  one mixer per scan path (flattening orders of the voxel grid, forward or reversed), the gate
  applied through SiLU, an output projection and a residual connection;
* :class:`CBVSynthNet`: the encoder-decoder around ``ssm_blocks`` of those blocks;
* :func:`predict_tiled` / :func:`synthesise_cbv`: whole-volume synthesis from overlapping
  patches whose predictions are averaged.

No paired T1w/CBV data set is public, so brainage ships **no CBV synthesis weights**.  The
``vgg-cbv`` model's CBV branch runs only when the user supplies either a checkpoint trained with
``python -m training.cbv_synth`` on their own paired data (read by :func:`load_cbv_synth`) or
measured CBV maps.

Deviations from the paper, which gives no further detail: the scan paths are axis-order
raster scans (not Hilbert curves), the bottleneck has 2 blocks by default (the paper has 9), no
Vision Transformer module sits beside them, and the convolutions use instance normalisation.
"""

from __future__ import annotations

import math
from itertools import product
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

from ..errors import ModelError
from ._checks import check_int, check_net_args

__all__ = ["selective_scan", "SelectiveSSM", "StateSpaceBlock", "CBVSynthNet", "scan_orders",
           "normalise_t1w", "predict_tiled", "synthesise_cbv", "load_cbv_synth",
           "CBV_CHECKPOINT_FORMAT"]

#: ``format`` entry of the checkpoints :func:`load_cbv_synth` reads.
CBV_CHECKPOINT_FORMAT = "brainage-cbv-synth-1"


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """``out[..., t, s] = a[..., s+1] + ... + a[..., t]`` for ``s <= t``, ``-inf`` above.

    Summed per segment rather than as a difference of cumulative sums, which would cancel
    catastrophically in float32 once the cumulative decay is large.
    """
    n = a.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=a.device).tril()
    strict = lower.tril(-1)
    terms = a.unsqueeze(-1).expand(*a.shape, n).masked_fill(~strict, 0.0)  # [i, s] = a_i, i > s
    return terms.cumsum(-2).masked_fill(~lower, float("-inf"))


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None, *,
                   chunk: int = 32) -> torch.Tensor:
    """Selective state-space scan (S6) with zero-order-hold discretisation.

    For every channel ``d`` and state ``n``, from ``h_0 = 0``::

        h_t = exp(delta_t A) h_{t-1} + (exp(delta_t A) - 1) / A * B_t u_t
        y_t = sum_n C_t h_t + D u_t

    (exact ZOH for a diagonal ``A``; Mamba approximates the input term by ``delta_t B_t u_t``).

    Parameters
    ----------
    u : Tensor, shape (batch, length, channels)
        Input sequence.
    delta : Tensor, shape (batch, length, channels)
        Positive, input-dependent step sizes.
    A : Tensor, shape (channels, state)
        Diagonal state matrix; every entry must be negative (a stable, decaying state).
    B, C : Tensor, shape (batch, length, state)
        Input-dependent input and output matrices.
    D : Tensor, shape (channels,), optional
        Skip connection.
    chunk : int, default 32
        Tokens solved in closed form at once; memory grows with ``chunk**2``, the number of
        sequential steps with ``length / chunk``.  The result does not depend on it.

    Returns
    -------
    Tensor, shape (batch, length, channels)

    Raises
    ------
    ValueError
        When the shapes disagree or ``A`` has an entry >= 0.

    Examples
    --------
    A single channel and state with ``A = -ln 2`` and ``delta = 1`` halves the state each step
    and scales the input by ``(1/2 - 1) / -ln 2``:

    >>> u = torch.tensor([[[1.0], [0.0], [0.0]]])
    >>> A = torch.tensor([[-math.log(2.0)]])
    >>> y = selective_scan(u, torch.ones_like(u), A, torch.ones(1, 3, 1), torch.ones(1, 3, 1))
    >>> [round(v * math.log(2.0), 4) for v in y.flatten().tolist()]
    [0.5, 0.25, 0.125]
    """
    check_int("chunk", chunk)
    batch, length, channels = u.shape
    if delta.shape != u.shape or A.shape[0] != channels or B.shape != (batch, length, A.shape[1]) \
            or C.shape != B.shape or (D is not None and D.shape != (channels,)):
        raise ValueError(f"selective_scan shapes disagree: u {tuple(u.shape)}, delta "
                         f"{tuple(delta.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)}, D {None if D is None else tuple(D.shape)}")
    if not bool((A < 0).all()):
        raise ValueError("selective_scan needs a negative A (every entry < 0)")
    # layout (batch, channels, state, length): the scan runs along the last axis
    dA = (delta.unsqueeze(-1) * A).permute(0, 2, 3, 1)
    inputs = (torch.expm1(dA) / A[..., None]) * B.permute(0, 2, 1).unsqueeze(1) \
        * u.permute(0, 2, 1).unsqueeze(2)
    C_t = C.permute(0, 2, 1).unsqueeze(1)
    h = u.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for start in range(0, length, chunk):
        part = slice(start, min(start + chunk, length))
        a, x = dA[..., part], inputs[..., part]
        decay = torch.exp(_segment_sums(a))  # (b, d, n, T, T): from step s to step t
        states = (decay @ x.unsqueeze(-1)).squeeze(-1) + torch.exp(a.cumsum(-1)) * h.unsqueeze(-1)
        outputs.append((states * C_t[..., part]).sum(2))
        h = states[..., -1]
    y = torch.cat(outputs, -1).permute(0, 2, 1)
    return y if D is None else y + u * D


class SelectiveSSM(nn.Module):
    """Mamba-style selective state-space mixer on a token sequence (causal).

    Parameters
    ----------
    channels : int
        Token width.
    d_state : int, default 16
        State size per channel.
    conv_kernel : int, default 4
        Width of the causal depthwise convolution before the scan.
    dt_rank : int, optional
        Rank of the ``delta`` projection; ``ceil(channels / 16)`` by default.
    dt_range : (float, float), default (1e-3, 0.1)
        Range of the initial step sizes (log-uniform).
    chunk : int, default 32
        Passed to :func:`selective_scan`.

    Examples
    --------
    >>> SelectiveSSM(8, d_state=4)(torch.zeros(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, channels: int, d_state: int = 16, conv_kernel: int = 4,
                 dt_rank: int | None = None, dt_range: tuple[float, float] = (1e-3, 0.1),
                 chunk: int = 32) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("d_state", d_state),
                            ("conv_kernel", conv_kernel), ("chunk", chunk)):
            check_int(name, value)
        self.dt_rank = check_int("dt_rank", dt_rank) if dt_rank is not None else math.ceil(channels / 16)
        self.d_state, self.chunk = d_state, chunk
        self.conv = nn.Conv1d(channels, channels, conv_kernel, groups=channels,
                              padding=conv_kernel - 1)
        self.x_proj = nn.Linear(channels, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, channels)
        # initial step sizes log-uniform in dt_range: softplus(bias) = dt
        dt = torch.exp(torch.empty(channels).uniform_(math.log(dt_range[0]), math.log(dt_range[1])))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real initialisation: A_n = -n, log-parameterised so A stays negative in training
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(channels, 1))
        self.D = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, length, channels) -> same shape; token t sees tokens <= t only."""
        length = x.shape[1]
        x = F.silu(self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        return selective_scan(x, delta, -torch.exp(self.A_log), B, C, self.D, chunk=self.chunk)


def scan_orders(shape: Sequence[int], paths: int) -> list[torch.Tensor]:
    """Token orders of the first ``paths`` scan paths over a voxel grid of ``shape``.

    Path ``2k`` flattens the grid with its axes rolled by ``k`` (the last axis fastest), path
    ``2k + 1`` is the same order reversed: ``2 * len(shape)`` paths in all.

    Parameters
    ----------
    shape : sequence of int
        Grid shape (2 or 3 axes).
    paths : int
        Number of paths, 1 to ``2 * len(shape)``.

    Returns
    -------
    list of Tensor
        For each path, the natural (C-order) index of the token visited at each step.

    Examples
    --------
    >>> [o.tolist() for o in scan_orders((2, 2), 4)]
    [[0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 1, 3], [3, 1, 2, 0]]
    """
    dims = len(shape)
    check_int("paths", paths)
    if paths > 2 * dims:
        raise ValueError(f"paths must be <= {2 * dims} for a {dims}D grid, got {paths}")
    grid = torch.arange(math.prod(shape)).reshape(tuple(shape))
    orders = []
    for k in range(dims):
        forward = grid.permute(*[(k + i) % dims for i in range(dims)]).flatten()
        orders += [forward, forward.flip(0)]
    return orders[:paths]


class StateSpaceBlock(nn.Module):
    """Visual state-space block on a feature map: selective scans along several paths.

    ``out = x + W_out[(sum_p SSM_p(order_p(x_in))) * silu(z)]`` with ``(x_in, z) =
    W_in LayerNorm(x)``.  With ``scan_paths = 1`` the block is causal in the natural (C-order)
    flattening of the grid.

    Parameters
    ----------
    channels : int
        Feature channels.
    d_state : int, default 16
    expand : int, default 2
        Inner width is ``expand * channels``.
    scan_paths : int, default 2
        See :func:`scan_orders`.
    conv_kernel : int, default 4
    chunk : int, default 32

    Examples
    --------
    >>> StateSpaceBlock(8, d_state=4)(torch.zeros(1, 8, 2, 3, 4)).shape
    torch.Size([1, 8, 2, 3, 4])
    """

    def __init__(self, channels: int, d_state: int = 16, expand: int = 2, scan_paths: int = 2,
                 conv_kernel: int = 4, chunk: int = 32) -> None:
        super().__init__()
        inner = check_int("expand", expand) * check_int("channels", channels)
        self.scan_paths = check_int("scan_paths", scan_paths)
        self.norm = nn.LayerNorm(channels)
        self.in_proj = nn.Linear(channels, 2 * inner)
        self.mixers = nn.ModuleList(SelectiveSSM(inner, d_state, conv_kernel, chunk=chunk)
                                    for _ in range(scan_paths))
        self.out_proj = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, channels, *grid) -> same shape."""
        tokens = x.flatten(2).transpose(1, 2)
        signal, gate = self.in_proj(self.norm(tokens)).chunk(2, dim=-1)
        mixed = torch.zeros_like(signal)
        for order, mixer in zip(scan_orders(x.shape[2:], self.scan_paths), self.mixers):
            order = order.to(x.device)
            mixed = mixed + mixer(signal[:, order])[:, torch.argsort(order)]  # back to C order
        out = tokens + self.out_proj(mixed * F.silu(gate))
        return out.transpose(1, 2).reshape(x.shape)


class _ConvBlock(nn.Sequential):
    """Two (3^d convolution, instance norm, LeakyReLU) layers, size-preserving."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [Conv[Conv.CONV, spatial_dims](c_in, out_channels, 3, padding=1),
                       Norm[Norm.INSTANCE, spatial_dims](out_channels, affine=True),
                       nn.LeakyReLU(0.01)]
        super().__init__(*layers)


class CBVSynthNet(nn.Module):
    """3D (or 2D) encoder-decoder CNN with a selective state-space bottleneck: T1w -> CBV.

    Parameters
    ----------
    spatial_dims : int, default 3
    in_channels, out_channels : int, default 1
    channels : sequence of int, default (16, 32, 64, 128)
        Width of each level; ``len(channels) - 1`` max-poolings, so patch sides must be
        multiples of :attr:`patch_multiple`.
    ssm_blocks : int, default 2
        :class:`StateSpaceBlock` s in the bottleneck (the paper: 9).
    d_state, expand, scan_paths, conv_kernel, chunk : int
        Passed to each :class:`StateSpaceBlock`.

    Examples
    --------
    >>> net = CBVSynthNet(channels=(4, 8), ssm_blocks=1, d_state=4)
    >>> net(torch.zeros(2, 1, 8, 8, 8)).shape, net.patch_multiple
    (torch.Size([2, 1, 8, 8, 8]), 2)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 channels: Sequence[int] = (16, 32, 64, 128), ssm_blocks: int = 2,
                 d_state: int = 16, expand: int = 2, scan_paths: int = 2, conv_kernel: int = 4,
                 chunk: int = 32) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        check_net_args(spatial_dims, in_channels=in_channels, out_channels=out_channels,
                       **{f"channels[{i}]": c for i, c in enumerate(channels)})
        check_int("ssm_blocks", ssm_blocks, minimum=0)
        if not channels:
            raise ValueError("channels must name at least one level")
        #: constructor arguments, saved in checkpoints to rebuild the network
        self.init_args: dict[str, Any] = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "channels": channels, "ssm_blocks": ssm_blocks, "d_state": d_state, "expand": expand,
            "scan_paths": scan_paths, "conv_kernel": conv_kernel, "chunk": chunk}
        self.patch_multiple = 2 ** (len(channels) - 1)
        widths = [in_channels, *channels]
        self.encoder = nn.ModuleList(_ConvBlock(spatial_dims, widths[i], widths[i + 1])
                                     for i in range(len(channels)))
        self.pool = Pool[Pool.MAX, spatial_dims](2)
        self.bottleneck = nn.Sequential(*[
            StateSpaceBlock(channels[-1], d_state, expand, scan_paths, conv_kernel, chunk)
            for _ in range(ssm_blocks)])
        self.up = nn.ModuleList(Conv[Conv.CONVTRANS, spatial_dims](channels[i + 1], channels[i], 2, stride=2)
                                for i in reversed(range(len(channels) - 1)))
        self.decoder = nn.ModuleList(_ConvBlock(spatial_dims, 2 * channels[i], channels[i])
                                     for i in reversed(range(len(channels) - 1)))
        self.head = Conv[Conv.CONV, spatial_dims](channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, in_channels, *patch) -> (batch, out_channels, *patch)."""
        if any(s % self.patch_multiple for s in x.shape[2:]):
            raise ValueError(f"patch sides must be multiples of {self.patch_multiple}, "
                             f"got {tuple(x.shape[2:])}")
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = self.bottleneck(skips.pop())
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def normalise_t1w(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """T1w divided by the mean of its top 1 % intensities (the paper's modified min-max scaling).

    Parameters
    ----------
    data : ndarray
        T1w intensities.
    mask : ndarray of bool, optional
        Voxels the top 1 % is taken from; the non-zero voxels by default.

    Returns
    -------
    ndarray of float32

    Raises
    ------
    ValueError
        When the mask is empty or the top intensities are not positive.

    Examples
    --------
    >>> [round(float(v), 4) for v in normalise_t1w(np.arange(0.0, 201.0))[[0, 199, 200]]]  # top 2: 199.5
    [0.0, 0.9975, 1.0025]
    """
    values = np.asarray(data, dtype=np.float32)
    inside = values[values != 0] if mask is None else values[np.asarray(mask, dtype=bool)]
    if inside.size == 0:
        raise ValueError("cannot normalise a T1w with no voxel inside the mask")
    k = max(1, math.ceil(0.01 * inside.size))
    scale = float(np.partition(inside, inside.size - k)[-k:].mean())
    if not scale > 0:
        raise ValueError(f"the top 1 % T1w intensities average {scale}, not a positive value")
    return values / np.float32(scale)


def _tile_starts(size: int, patch: int, step: int) -> list[int]:
    starts = list(range(0, size - patch + 1, step))
    return starts if starts[-1] == size - patch else [*starts, size - patch]


def predict_tiled(net: Callable[[torch.Tensor], torch.Tensor], volume: np.ndarray,
                  patch: int | Sequence[int], *, overlap: float = 0.5, batch_size: int = 4,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Apply a patch network to a whole single-channel volume: overlapping tiles, averaged.

    Tiles start every ``patch * (1 - overlap)`` voxels along each axis, and the last tile of an
    axis ends at its border; a volume smaller than the patch is zero-padded, then cropped back.
    Every voxel gets the mean of the predictions of the tiles that cover it (summed in float64,
    so an identity network returns the input exactly).

    Parameters
    ----------
    net : callable
        Maps (batch, 1, *patch) to (batch, out_channels, *patch); put it in eval mode first.
    volume : ndarray
        Single-channel volume, shape ``grid`` (2 or 3 axes).
    patch : int or sequence of int
        Tile side(s).
    overlap : float, default 0.5
        Fraction of a tile shared with the next one, in [0, 1).
    batch_size : int, default 4
    device : str or torch.device, default "cpu"

    Returns
    -------
    ndarray of float32
        Shape ``grid`` for a one-channel output, else ``(out_channels, *grid)``.

    Examples
    --------
    >>> vol = np.arange(60.0).reshape(3, 4, 5)
    >>> bool((predict_tiled(lambda x: 2 * x, vol, 2) == 2 * vol).all())
    True
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    check_int("batch_size", batch_size)
    grid = np.asarray(volume, dtype=np.float32)
    sides = [patch] * grid.ndim if isinstance(patch, int) else [int(p) for p in patch]
    if len(sides) != grid.ndim:
        raise ValueError(f"patch {patch} does not match a {grid.ndim}D volume")
    for side in sides:
        check_int("patch", side)
    shape = grid.shape
    grid = np.pad(grid, [(0, max(0, p - s)) for p, s in zip(sides, shape)])
    corners = list(product(*(_tile_starts(s, p, max(1, int(p * (1 - overlap))))
                             for s, p in zip(grid.shape, sides))))
    total: np.ndarray | None = None
    count = np.zeros(grid.shape, dtype=np.float64)
    with torch.inference_mode():
        for first in range(0, len(corners), batch_size):
            batch = corners[first:first + batch_size]
            boxes = [tuple(slice(c, c + p) for c, p in zip(corner, sides)) for corner in batch]
            x = torch.from_numpy(np.stack([grid[box] for box in boxes])[:, None]).to(device)
            pred = net(x).detach().to("cpu", torch.float64).numpy()
            if total is None:
                total = np.zeros((pred.shape[1], *grid.shape), dtype=np.float64)
            for box, tile in zip(boxes, pred):
                total[(slice(None), *box)] += tile
                count[box] += 1
    mean = (total / count)[(slice(None), *(slice(0, s) for s in shape))].astype(np.float32)
    return mean[0] if mean.shape[0] == 1 else mean


def synthesise_cbv(net: CBVSynthNet, t1w: np.ndarray, patch: int | Sequence[int], *,
                   overlap: float = 0.5, batch_size: int = 4,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """CBV map (in units of its brain median) of a skull-stripped T1w volume.

    The T1w is normalised by :func:`normalise_t1w` (as in training), tiled through ``net`` by
    :func:`predict_tiled`, and the result is zeroed outside the brain (the non-zero T1w voxels).

    Parameters
    ----------
    net : CBVSynthNet
        A trained network (see :func:`load_cbv_synth`).
    t1w : ndarray
        Skull-stripped T1w, zero outside the brain, on the grid the network was trained on.
    patch : int or sequence of int
    overlap, batch_size, device
        As in :func:`predict_tiled`.

    Returns
    -------
    ndarray of float32
    """
    brain = np.asarray(t1w) != 0
    net.eval()
    cbv = predict_tiled(net.to(device), normalise_t1w(t1w, brain), patch, overlap=overlap,
                        batch_size=batch_size, device=device)
    return np.where(brain, cbv, 0).astype(np.float32)


def load_cbv_synth(path: str | Path,
                   map_location: str | torch.device = "cpu") -> tuple[CBVSynthNet, dict[str, Any]]:
    """Rebuild a :class:`CBVSynthNet` from a checkpoint written by ``training.cbv_synth``.

    Parameters
    ----------
    path : path
        ``cbv_synth.pt`` (or a ``checkpoint_latest.pt``) loaded with ``weights_only=True``.
    map_location : str or torch.device, default "cpu"

    Returns
    -------
    (CBVSynthNet, dict)
        The network in eval mode and the checkpoint's other entries (``patch``, ``epoch`` ...).

    Raises
    ------
    ModelError
        When the file is missing, unreadable or not a CBV synthesis checkpoint.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"cannot read the CBV synthesis checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CBV_CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a CBV synthesis checkpoint (format "
                         f"{CBV_CHECKPOINT_FORMAT!r}); train one with `python -m training.cbv_synth`")
    net = CBVSynthNet(**state["model_args"])
    net.load_state_dict(state["model"])
    net.eval()
    return net, {k: v for k, v in state.items() if k not in ("model", "optimizer")}
