"""Spatial transforms: synthetic thick slicing, resampling to a spacing, crop/pad, shift, flip.

All of them keep the affine exact, so a volume can always be mapped back to the grid it came
from (the relevance maps are returned to the input grid that way).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from .base import Transform, Volume

__all__ = ["axial_axis", "slicing_step", "ThickSliceSimulation", "SimulateThickSlices",
           "ResampleToSpacing", "CropOrPad", "Shift", "Flip", "foreground_centre"]


def axial_axis(affine: np.ndarray) -> int:
    """Array axis closest to the superior-inferior world axis (the axial slice direction)."""
    directions = np.abs(np.asarray(affine, dtype=float)[:3, :3])
    directions = directions / directions.sum(axis=0, keepdims=True)
    return int(np.argmax(directions[2]))


def slicing_step(axial_spacing_mm: float, gap_mm: float = 7.0) -> int:
    """Smallest integer ``k`` with ``k * axial_spacing_mm >= gap_mm`` (the seed's slice gap rule).

    Examples
    --------
    >>> slicing_step(2.0), slicing_step(1.0), slicing_step(0.8), slicing_step(1.2)
    (4, 7, 9, 6)
    """
    if not axial_spacing_mm > 0:
        raise ValueError(f"axial_spacing_mm must be > 0, got {axial_spacing_mm!r}")
    if not gap_mm > 0:
        raise ValueError(f"gap_mm must be > 0, got {gap_mm!r}")
    # tolerance: 1.75 mm x 4 must count as 7 mm despite float rounding
    return max(1, math.ceil(gap_mm / axial_spacing_mm - 1e-6))


def _index_affine(axis_scale: Sequence[float], start: Sequence[float]) -> np.ndarray:
    """Affine from new voxel indices to old voxel indices (diagonal scale plus offset)."""
    out = np.eye(4)
    out[:3, :3] = np.diag(np.asarray(axis_scale, dtype=float))
    out[:3, 3] = np.asarray(start, dtype=float)
    return out


class ThickSliceSimulation(Transform):
    """Keep every ``k``-th axial slice, starting at ``offset``: a synthetic 2D axial acquisition.

    ``k`` is the smallest integer multiple of the axial spacing reaching ``gap_mm`` (seed 004:
    7 mm).  The result has the sparse slices and an affine whose axial voxel size is
    ``k * spacing``; interpolate it back with :class:`ResampleToSpacing`.

    Parameters
    ----------
    gap_mm : float
        Minimum distance between kept slices.
    offset : int
        Index of the first kept slice, ``0 <= offset < k``; different offsets give different
        synthetic scans of the same subject.
    """

    def __init__(self, gap_mm: float = 7.0, offset: int = 0) -> None:
        if not float(gap_mm) > 0:
            raise ValueError(f"gap_mm must be > 0, got {gap_mm!r}")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        self.gap_mm = float(gap_mm)
        self.offset = int(offset)

    def apply_transform(self, volume: Volume) -> Volume:
        axis = axial_axis(volume.affine)
        step = slicing_step(float(volume.zooms[axis]), self.gap_mm)
        if self.offset >= step:
            raise ValueError(f"offset must be < {step} (the slicing step for "
                             f"{volume.zooms[axis]:.2f} mm slices), got {self.offset}")
        if volume.shape[axis] <= self.offset:
            raise ValueError(f"volume has only {volume.shape[axis]} axial slices")
        index = [slice(None)] * 3
        index[axis] = slice(self.offset, None, step)
        scale, start = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
        scale[axis], start[axis] = float(step), float(self.offset)
        affine = volume.affine @ _index_affine(scale, start)
        return volume.with_data(np.ascontiguousarray(volume.data[tuple(index)]), affine)


class SimulateThickSlices(Transform):
    """Re-acquire a volume as thick axial slices (for robustness tests).

    Each new slice averages the signal over ``thickness_mm`` around its centre (box profile,
    linear interpolation between the thin slices); slice centres are ``spacing_mm`` apart and
    centred in the original field of view.

    Parameters
    ----------
    spacing_mm : float
        Distance between slice centres.
    thickness_mm : float, optional
        Slab thickness (default: ``spacing_mm``, contiguous slices).
    """

    def __init__(self, spacing_mm: float, thickness_mm: float | None = None) -> None:
        if not float(spacing_mm) > 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm!r}")
        if thickness_mm is not None and not float(thickness_mm) > 0:
            raise ValueError(f"thickness_mm must be > 0, got {thickness_mm!r}")
        self.spacing_mm = float(spacing_mm)
        self.thickness_mm = float(thickness_mm if thickness_mm is not None else spacing_mm)

    def apply_transform(self, volume: Volume) -> Volume:
        axis = axial_axis(volume.affine)
        dz = float(volume.zooms[axis])
        n_in = volume.shape[axis]
        n_out = max(1, int(round(n_in * dz / self.spacing_mm)))
        ratio = self.spacing_mm / dz
        centres = (n_in - 1) / 2 + (np.arange(n_out) - (n_out - 1) / 2) * ratio
        # sub-samples every <= 0.5 mm across the slab, averaged (box slice profile)
        n_sub = max(1, int(math.ceil(self.thickness_mm / min(dz, 0.5))))
        rel = (np.arange(n_sub) + 0.5) / n_sub - 0.5
        data = np.moveaxis(volume.data, axis, 0)
        out = np.zeros((n_out,) + data.shape[1:], dtype=np.float32)
        for r in rel:
            pos = np.clip(centres + r * self.thickness_mm / dz, 0, n_in - 1)
            low = np.floor(pos).astype(int)
            high = np.minimum(low + 1, n_in - 1)
            w = (pos - low)[:, None, None]
            out += (1 - w) * data[low] + w * data[high]
        out /= len(rel)
        scale, start = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
        scale[axis], start[axis] = ratio, centres[0]
        affine = volume.affine @ _index_affine(scale, start)
        return volume.with_data(np.ascontiguousarray(np.moveaxis(out, 0, axis)), affine)


class ResampleToSpacing(Transform):
    """Resample to an isotropic spacing on a grid aligned with the array axes (no registration).

    The new grid covers the same field of view (centre preserved).  Axes that are downsampled
    are first smoothed with a Gaussian of ``sigma = (ratio - 1) / 2`` input voxels against
    aliasing; axes that are upsampled (thick slices) are interpolated linearly.

    Parameters
    ----------
    spacing_mm : float
        Output voxel size.
    order : int
        Spline order (1 = trilinear).
    antialias : bool
        Smooth downsampled axes first.
    """

    def __init__(self, spacing_mm: float = 2.0, order: int = 1, antialias: bool = True) -> None:
        if not float(spacing_mm) > 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm!r}")
        if order not in (0, 1, 3):
            raise ValueError(f"order must be 0, 1 or 3, got {order!r}")
        self.spacing_mm = float(spacing_mm)
        self.order = int(order)
        self.antialias = bool(antialias)

    def apply_transform(self, volume: Volume) -> Volume:
        zooms = volume.zooms
        shape_in = np.array(volume.shape)
        ratio = self.spacing_mm / zooms
        shape_out = np.maximum(1, np.round(shape_in / ratio)).astype(int)
        start = (shape_in - 1) / 2 - (shape_out - 1) / 2 * ratio
        data = volume.data.astype(np.float32, copy=False)
        if self.antialias and np.any(ratio > 1.01):
            sigma = np.where(ratio > 1.01, (ratio - 1) / 2, 0.0)
            data = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
        out = ndimage.affine_transform(data, np.diag(ratio), offset=start, output_shape=tuple(shape_out),
                                       order=self.order, mode="nearest")
        affine = volume.affine @ _index_affine(ratio, start)
        return volume.with_data(out.astype(np.float32, copy=False), affine)


def foreground_centre(data: np.ndarray) -> np.ndarray:
    """Centre (voxel indices) of the bounding box of non-zero voxels, or of the array."""
    nonzero = np.nonzero(data)
    if len(nonzero[0]) == 0:
        return (np.array(data.shape) - 1) / 2
    return np.array([(idx.min() + idx.max()) / 2 for idx in nonzero])


class CropOrPad(Transform):
    """Crop or zero-pad to a fixed shape around the foreground (or array) centre.

    Parameters
    ----------
    shape : (int, int, int)
        Output shape.
    centre : {"foreground", "array"}
        Centre the window on the bounding box of non-zero voxels (a skull-stripped brain) or
        on the array centre.
    """

    def __init__(self, shape: Sequence[int], centre: str = "foreground") -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be three positive ints, got {shape!r}")
        if centre not in ("foreground", "array"):
            raise ValueError(f"centre must be 'foreground' or 'array', got {centre!r}")
        self.shape = shape
        self.centre = centre

    def apply_transform(self, volume: Volume) -> Volume:
        target = np.array(self.shape)
        centre = (foreground_centre(volume.data) if self.centre == "foreground"
                  else (np.array(volume.shape) - 1) / 2)
        start = np.round(centre - (target - 1) / 2).astype(int)
        out = np.zeros(self.shape, dtype=volume.data.dtype)
        src, dst = [], []
        for size_in, size_out, s in zip(volume.shape, self.shape, start):
            lo, hi = max(s, 0), min(s + size_out, size_in)
            if hi <= lo:  # window entirely outside the image: all zeros
                lo = hi = 0
            src.append(slice(lo, hi))
            dst.append(slice(lo - s, lo - s + (hi - lo)))
        out[tuple(dst)] = volume.data[tuple(src)]
        affine = volume.affine @ _index_affine((1, 1, 1), start)
        return volume.with_data(out, affine)


class Shift(Transform):
    """Shift the content by whole voxels, filling with zeros (the field of view stays put).

    Parameters
    ----------
    shift : (int, int, int)
        Voxels along each array axis (positive = towards higher indices).
    """

    def __init__(self, shift: Sequence[int]) -> None:
        shift = tuple(int(s) for s in shift)
        if len(shift) != 3:
            raise ValueError(f"shift must have three ints, got {shift!r}")
        self.shift = shift

    def apply_transform(self, volume: Volume) -> Volume:
        data = volume.data
        out = np.zeros_like(data)
        src, dst = [], []
        for n, s in zip(data.shape, self.shift):
            if abs(s) >= n:
                return volume.with_data(out)
            src.append(slice(max(0, -s), n - max(0, s)))
            dst.append(slice(max(0, s), n - max(0, -s)))
        out[tuple(dst)] = data[tuple(src)]
        return volume.with_data(out)


class Flip(Transform):
    """Mirror the content along array axes (axis 0 of a RAS volume = the sagittal mirror).

    Parameters
    ----------
    axes : sequence of int
        Axes to flip.
    """

    def __init__(self, axes: Sequence[int] = (0,)) -> None:
        axes = tuple(int(a) for a in axes)
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"axes must be among 0, 1, 2, got {axes!r}")
        self.axes = axes

    def apply_transform(self, volume: Volume) -> Volume:
        if not self.axes:
            return volume.with_data(volume.data)
        return volume.with_data(np.ascontiguousarray(np.flip(volume.data, self.axes)))
