"""Voxel grids: resampling between grids, the 2 mm working grid, cropping, NIfTI construction.

Everything here is numpy/scipy on nibabel images (world coordinates are RAS mm, as in nibabel),
so it is cheap to import and easy to test against analytic answers.
"""

from __future__ import annotations

import numbers
import warnings

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "new_image",
    "voxel_volume_ml",
    "grid_spacing",
    "antialias_sigma",
    "resample_to_grid",
    "data_on_grid",
    "working_grid",
    "mask_bounding_box",
    "crop",
]

def new_image(data: np.ndarray, affine: np.ndarray, dtype: type | np.dtype = np.float32) -> nib.Nifti1Image:
    """A NIfTI image with both qform and sform set to ``affine`` (code 1) and units in mm.

    Parameters
    ----------
    data : ndarray
        Voxel values (cast to ``dtype``).
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS mm) matrix.
    dtype : dtype, default float32
        On-disk and in-memory data type.

    Returns
    -------
    nibabel.Nifti1Image
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    # Both codes set: ANTs/ITK and nibabel then agree on the geometry, whichever they read.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def grid_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each voxel axis: norms of the affine's columns."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def voxel_volume_ml(img: nib.spatialimages.SpatialImage) -> float:
    """Volume of one voxel in mL (absolute determinant of the affine's linear part / 1000)."""
    return float(abs(np.linalg.det(np.asarray(img.affine, dtype=float)[:3, :3]))) / 1000.0


def antialias_sigma(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """Gaussian sigma (source voxels) that turns point sampling into ~footprint averaging.

    Along each source axis, the destination spacing is ``1 / |T^-1 e|`` (``T`` the destination's
    linear part, ``e`` the unit source axis); the Gaussian has the variance of a box of the
    missing width, ``(s_dst^2 - s_src^2) / 12``, as for block averaging.

    Parameters
    ----------
    src_affine, dst_affine : ndarray, shape (4, 4)
        Voxel-to-world matrices of the source and destination grids.

    Returns
    -------
    ndarray, shape (3,)
        Sigma per source axis in source voxels (0 where the destination is not coarser).
    """
    src_lin = np.asarray(src_affine, dtype=float)[:3, :3]
    src_sp = grid_spacing(src_affine)
    dst_inv = np.linalg.inv(np.asarray(dst_affine, dtype=float)[:3, :3])
    sigma = np.zeros(3)
    for axis in range(3):
        direction = src_lin[:, axis] / src_sp[axis]
        dst_sp = 1.0 / np.linalg.norm(dst_inv @ direction)
        extra = dst_sp**2 - src_sp[axis] ** 2
        sigma[axis] = np.sqrt(extra / 12.0) / src_sp[axis] if extra > 1e-6 else 0.0
    return sigma


def resample_to_grid(img: nib.spatialimages.SpatialImage, shape: tuple[int, int, int],
                     affine: np.ndarray, *, order: int = 1, antialias: bool = True,
                     mode: str = "constant", cval: float = 0.0,
                     dtype: type | np.dtype = np.float32) -> nib.Nifti1Image:
    """Resample a 3D image onto another grid (world coordinates; no transform between them).

    Parameters
    ----------
    img : nibabel image
        3D source image.
    shape : tuple of 3 int
        Destination grid shape.
    affine : ndarray, shape (4, 4)
        Destination voxel-to-world matrix.
    order : int, default 1
        Spline order (0 nearest, 1 trilinear).
    antialias : bool, default True
        Gaussian pre-smoothing where the destination is coarser than the source (see
        :func:`antialias_sigma`); it keeps sums (volumes) of probability maps consistent.
    mode : str, default "constant"
        Outside the source: ``"constant"`` (``cval``) or ``"nearest"`` (edge extension).
    cval : float, default 0
        Value outside the source with ``mode="constant"``.
    dtype : dtype, default float32
        Output data type.

    Returns
    -------
    nibabel.Nifti1Image
    """
    if len(img.shape) != 3:
        raise ValueError(f"img must be 3D, got shape {img.shape}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape}")
    if not isinstance(order, numbers.Integral) or not 0 <= order <= 3:
        raise ValueError(f"order must be an integer in 0..3, got {order!r}")
    if mode not in ("constant", "nearest"):
        raise ValueError(f"mode must be 'constant' or 'nearest', got {mode!r}")
    affine = np.asarray(affine, dtype=float)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if antialias and order > 0:
        sigma = antialias_sigma(img.affine, affine)
        if sigma.max() > 0:
            data = ndi.gaussian_filter(data, sigma, mode="nearest")
    # destination voxel -> source voxel; scipy applies it per output voxel in C
    vox2vox = np.linalg.inv(np.asarray(img.affine, dtype=float)) @ affine
    matrix = vox2vox[:3, :3]
    if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-9):
        matrix = np.diag(matrix)  # axis-aligned grids: scipy's faster zoom-and-shift path
    with warnings.catch_warnings():
        # scipy notes that 1-D matrices changed meaning in 0.18; the meaning used here is the new one
        warnings.filterwarnings("ignore", message="The behavior of affine_transform with a 1-D array")
        out = ndi.affine_transform(data, matrix, offset=vox2vox[:3, 3], output_shape=shape, order=order,
                                   mode=mode, cval=cval, prefilter=order > 1)
    return new_image(out, affine, dtype)


def data_on_grid(img: nib.spatialimages.SpatialImage, shape: tuple[int, int, int],
                 affine: np.ndarray, *, atol: float = 1e-3) -> tuple[np.ndarray, bool]:
    """float32 voxel values of an image on the grid ``(shape, affine)``, resampled if need be.

    An image already on the grid (same shape, affine equal within ``atol``) is read as it is;
    any other is resampled onto it (anti-aliased trilinear, :func:`resample_to_grid`).  A
    singleton fourth axis is dropped first.

    Parameters
    ----------
    img : nibabel image
        3D source image, or 4D with one volume.
    shape : tuple of 3 int
        Grid shape.
    affine : ndarray, shape (4, 4)
        Grid voxel-to-world matrix.
    atol : float, default 1e-3
        Tolerance of the affine comparison.

    Returns
    -------
    data : ndarray of float32, shape ``shape``
    resampled : bool
        Whether the image was off the grid and had to be resampled.

    Examples
    --------
    >>> img = new_image(np.ones((4, 4, 4)), np.eye(4))
    >>> data, resampled = data_on_grid(img, (4, 4, 4), np.eye(4))
    >>> data.dtype, resampled
    (dtype('float32'), False)
    >>> data_on_grid(img, (2, 2, 2), np.diag([2.0, 2.0, 2.0, 1.0]))[1]
    True
    """
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if tuple(img.shape) == tuple(shape) and np.allclose(img.affine, affine, atol=atol):
        return np.asarray(img.dataobj, dtype=np.float32), False
    return resample_to_grid(img, shape, affine, order=1, antialias=True).get_fdata(dtype=np.float32), True


def working_grid(img: nib.spatialimages.SpatialImage,
                 resolution_mm: float = 2.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """The coarse grid on which transforms, the bias field and the segmentation are estimated.

    Axes keep the image's directions (no rotation); each axis spacing becomes
    ``max(native spacing, resolution_mm)``, so coarse axes (thick slices) are never upsampled.
    The grid covers the same field of view (voxel edges aligned with the native first voxel).

    Parameters
    ----------
    img : nibabel image
        Native image.
    resolution_mm : float, default 2.0
        Target spacing in mm.

    Returns
    -------
    shape : tuple of 3 int
    affine : ndarray, shape (4, 4)
    """
    if not isinstance(resolution_mm, numbers.Real) or not resolution_mm > 0:
        raise ValueError(f"resolution_mm must be a positive number, got {resolution_mm!r}")
    native = grid_spacing(img.affine)
    spacing = np.maximum(native, float(resolution_mm))
    factor = spacing / native
    shape = tuple(int(np.ceil(n / f - 1e-6)) for n, f in zip(img.shape[:3], factor))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factor)
    # centre of work voxel 0 sits half a work voxel inside the native field of view's edge
    scale[:3, 3] = (factor - 1.0) / 2.0
    return shape, np.asarray(img.affine, dtype=float) @ scale


def mask_bounding_box(mask: np.ndarray, affine: np.ndarray, margin_mm: float = 10.0) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask > 0``, grown by ``margin_mm`` and clipped to the grid.

    Raises
    ------
    ValueError
        If the mask is empty.
    """
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("mask is empty")
    margin = np.ceil(float(margin_mm) / grid_spacing(affine)).astype(int)
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(0, hits[0] - margin[axis]),
                            min(mask.shape[axis], hits[-1] + 1 + margin[axis])))
    return tuple(slices)


def crop(img: nib.spatialimages.SpatialImage, slices: tuple[slice, ...],
         dtype: type | np.dtype = np.float32) -> nib.Nifti1Image:
    """Sub-volume of a 3D image with its affine shifted accordingly (world positions unchanged)."""
    starts = np.array([s.start or 0 for s in slices], dtype=float)
    affine = np.asarray(img.affine, dtype=float).copy()
    affine[:3, 3] = affine[:3, :3] @ starts + affine[:3, 3]
    return new_image(np.asarray(img.dataobj)[tuple(slices)], affine, dtype)
