"""Blocks of a volume for a valid-convolution network: random training blocks, inference tiling.

A network like :class:`bidsapp.nets.LocalUNet` maps an input block of side ``in_size`` to the
central output block of side ``out_size``; the input block starts ``margin = (in_size -
out_size) / 2`` voxels before the output block on every axis.  Everything here is stated in
terms of the *output* block's origin (its first voxel on the volume's grid); input voxels
outside the volume are zero.

* :func:`sample_block` draws a training block whose output block is centred on a random
  brain-mask voxel (uniform over mask voxels), with the mask of the output block (the voxels
  whose loss counts);
* :func:`tile_origins` places output blocks with a given stride so that their union covers
  every mask voxel (the last block on each axis is moved back to end at the mask's edge);
* :func:`tile_predict` runs a block predictor over those tiles and averages overlapping
  outputs: the voxelwise map (NaN outside the mask).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["crop_padded", "sample_block", "tile_origins", "tile_coverage", "tile_predict",
           "block_margin"]


def block_margin(in_size: int, out_size: int) -> int:
    """Input voxels on each side of the output block.

    Examples
    --------
    >>> block_margin(52, 12)
    20
    """
    if out_size < 1 or in_size < out_size or (in_size - out_size) % 2:
        raise ValueError(f"in_size ({in_size}) - out_size ({out_size}) must be even and >= 0, "
                         "with out_size >= 1")
    return (in_size - out_size) // 2


def crop_padded(data: np.ndarray, start, size: int) -> np.ndarray:
    """The cube ``[start, start + size)`` of the last three axes, zero where outside ``data``.

    Examples
    --------
    >>> crop_padded(np.arange(4.0).reshape(1, 1, 4), (0, 0, -1), 3)[0, 0]
    array([0., 0., 1.])
    """
    data = np.asarray(data)
    lead = data.shape[:-3]
    out = np.zeros(lead + (size,) * 3, dtype=data.dtype)
    src, dst = [], []
    for axis, begin in enumerate(start):
        n = data.shape[data.ndim - 3 + axis]
        lo, hi = max(int(begin), 0), min(int(begin) + size, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(begin), hi - int(begin)))
    out[(Ellipsis, *dst)] = data[(Ellipsis, *src)]
    return out


def sample_block(data: np.ndarray, mask: np.ndarray, rng: np.random.Generator, in_size: int,
                 out_size: int, mask_voxels: np.ndarray | None = None):
    """A random training block whose output block is centred on a brain voxel.

    Parameters
    ----------
    data : ndarray, shape (C, X, Y, Z)
    mask : ndarray of bool, shape (X, Y, Z)
    rng : numpy.random.Generator
    in_size, out_size : int
    mask_voxels : ndarray, shape (n, 3), optional
        ``np.argwhere(mask)``, when the caller keeps it.

    Returns
    -------
    x : ndarray, shape (C, in_size, in_size, in_size)
    target_mask : ndarray of bool, shape (out_size,) * 3
        Mask voxels of the output block (at least the centre).
    origin : ndarray of int, shape (3,)
        Output block origin on the grid of ``data``.
    """
    margin = block_margin(in_size, out_size)
    voxels = np.argwhere(mask) if mask_voxels is None else mask_voxels
    if len(voxels) == 0:
        raise ValueError("the mask is empty: no block can be sampled")
    origin = voxels[int(rng.integers(len(voxels)))] - out_size // 2
    x = crop_padded(data, origin - margin, in_size)
    target = crop_padded(np.asarray(mask, dtype=bool), origin, out_size)
    return x, target, origin


def _axis_positions(lo: int, hi: int, out_size: int, stride: int) -> list[int]:
    extent = hi - lo
    n = max(1, math.ceil((extent - out_size) / stride) + 1)
    return sorted({lo + min(i * stride, max(extent - out_size, 0)) for i in range(n)})


def tile_origins(mask: np.ndarray, out_size: int, stride: int | None = None) -> np.ndarray:
    """Output-block origins whose blocks cover every voxel of ``mask``.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    out_size : int
        Side of the output block.
    stride : int, optional
        Step between blocks, 1 to ``out_size`` (default ``out_size``: no overlap except the last
        block of each axis, which ends at the mask's edge).

    Returns
    -------
    ndarray of int, shape (n, 3)
        Origins of the blocks that contain at least one mask voxel.

    Examples
    --------
    >>> m = np.zeros((10, 4, 4), bool); m[1:9, 1, 1] = True
    >>> tile_origins(m, 4)[:, 0].tolist()
    [1, 5]
    """
    stride = out_size if stride is None else int(stride)
    if not 1 <= stride <= out_size:
        raise ValueError(f"stride must be in [1, out_size={out_size}], got {stride}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros((0, 3), dtype=int)
    axes = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        axes.append(_axis_positions(int(hits[0]), int(hits[-1]) + 1, out_size, stride))
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    keep = [crop_padded(mask, o, out_size).any() for o in grid]
    return grid[np.asarray(keep, dtype=bool)]


def tile_coverage(mask: np.ndarray, origins: np.ndarray, out_size: int) -> np.ndarray:
    """How many output blocks cover each voxel of the grid of ``mask`` (int32)."""
    count = np.zeros(np.shape(mask), dtype=np.int32)
    for origin in origins:
        lo = np.maximum(origin, 0)
        hi = np.minimum(origin + out_size, count.shape)
        count[tuple(slice(a, b) for a, b in zip(lo, hi))] += 1
    return count


def tile_predict(predict: Callable[[np.ndarray], np.ndarray], data: np.ndarray, mask: np.ndarray,
                 in_size: int, out_size: int, *, stride: int | None = None,
                 batch_size: int = 4) -> np.ndarray:
    """Voxelwise map of a block predictor over the mask: tiles averaged where they overlap.

    Parameters
    ----------
    predict : callable
        Maps input blocks ``(b, C, in, in, in)`` (float32) to output blocks ``(b, out, out,
        out)``.
    data : ndarray, shape (C, X, Y, Z)
    mask : ndarray of bool, shape (X, Y, Z)
    in_size, out_size : int
    stride : int, optional
        See :func:`tile_origins`.
    batch_size : int

    Returns
    -------
    ndarray, shape (X, Y, Z)
        float32 mean of the covering blocks' outputs inside ``mask``, NaN elsewhere.
    """
    margin = block_margin(in_size, out_size)
    mask = np.asarray(mask, dtype=bool)
    origins = tile_origins(mask, out_size, stride)
    total = np.zeros(mask.shape, dtype=np.float64)
    count = np.zeros(mask.shape, dtype=np.int32)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        x = np.stack([crop_padded(data, o - margin, in_size) for o in chunk]).astype(np.float32)
        out = np.asarray(predict(x), dtype=np.float64)
        if out.shape != (len(chunk),) + (out_size,) * 3:
            raise ValueError(f"predict returned {out.shape}, expected "
                             f"{(len(chunk),) + (out_size,) * 3}")
        for origin, block in zip(chunk, out):
            lo = np.maximum(origin, 0)
            hi = np.minimum(origin + out_size, mask.shape)
            grid = tuple(slice(a, b) for a, b in zip(lo, hi))
            local = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
            total[grid] += block[local]
            count[grid] += 1
    result = np.full(mask.shape, np.nan, dtype=np.float32)
    result[mask] = (total[mask] / count[mask]).astype(np.float32)
    return result
