"""N4 bias field correction (Tustison et al., 2010), estimated on a coarse grid, applied at full resolution.

The field is smooth by construction (B-spline control points 200 mm apart at the first fitting
level, as in fMRIPrep), so it is estimated on the 2 mm working grid cropped to the brain's bounding
box (N4's cost grows with the voxel count), with N4's own shrink factor bringing the fit to ~6 mm
(on an IXI scan the field fitted at 6 mm matches the one fitted at 4 mm to r = 0.995, 95 % of brain
voxels within 3.5 %, in a quarter of the time).
Its logarithm is then interpolated trilinearly onto the native grid (edge values extended
outside the box) and the native image is divided by it.  The field is scaled to a geometric mean
of 1 inside the brain, so corrected intensities stay on the input's scale.
"""

from __future__ import annotations

import logging
import numbers

import nibabel as nib
import numpy as np

from ._runtime import check_nthreads, from_ants, import_ants, private_tempdir, to_ants
from .grid import crop, grid_spacing, mask_bounding_box, new_image, resample_to_grid, working_grid

__all__ = ["n4_correct"]

LOGGER = logging.getLogger("brainage.anat.bias")


def _to_work(img: nib.spatialimages.SpatialImage, shape, affine, *, is_mask: bool) -> nib.Nifti1Image:
    if tuple(img.shape) == tuple(shape) and np.allclose(img.affine, affine):
        data = np.asarray(img.dataobj, dtype=np.float32)
        return new_image(data > 0 if is_mask else data, affine, np.uint8 if is_mask else np.float32)
    out = resample_to_grid(img, shape, affine, order=1, antialias=True)
    if is_mask:
        return new_image(np.asarray(out.dataobj) > 0.5, affine, np.uint8)
    return out


def n4_correct(img: nib.spatialimages.SpatialImage, mask: nib.spatialimages.SpatialImage, *,
               resolution_mm: float = 2.0, fit_resolution_mm: float = 6.0,
               iterations: tuple[int, ...] = (50, 50, 50, 50), spline_distance_mm: float = 200.0,
               omp_nthreads: int = 1) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Estimate the N4 bias field inside ``mask`` on a coarse grid and correct ``img`` with it.

    Parameters
    ----------
    img : nibabel image
        3D T1w (native grid).
    mask : nibabel image
        Brain mask on the same grid (the field is fitted to brain voxels only).
    resolution_mm : float, default 2.0
        Working grid spacing (see :func:`bidsapp.anat.grid.working_grid`).
    fit_resolution_mm : float, default 6.0
        Approximate voxel size of N4's fitting (sets its shrink factor).
    iterations : tuple of int, default (50, 50, 50, 50)
        Iterations per fitting level (one B-spline mesh doubling per level).
    spline_distance_mm : float, default 200
        B-spline control point distance at the first level.
    omp_nthreads : int, default 1
        ITK threads.

    Returns
    -------
    corrected : nibabel.Nifti1Image
        float32, native grid, unmasked.
    field : nibabel.Nifti1Image
        float32 multiplicative bias field on the native grid (``img = corrected * field``).
    """
    omp_nthreads = check_nthreads(omp_nthreads)
    for name, value in (("resolution_mm", resolution_mm), ("fit_resolution_mm", fit_resolution_mm),
                        ("spline_distance_mm", spline_distance_mm)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not iterations or not all(isinstance(i, numbers.Integral) and i > 0 for i in iterations):
        raise ValueError(f"iterations must be positive integers, got {iterations!r}")
    if tuple(img.shape) != tuple(mask.shape[:3]):
        raise ValueError(f"img {img.shape} and mask {mask.shape} differ in shape")
    ants = import_ants(omp_nthreads)

    shape, affine = working_grid(img, resolution_mm)
    work = _to_work(img, shape, affine, is_mask=False)
    work_mask = _to_work(mask, shape, affine, is_mask=True)
    if not np.asarray(work_mask.dataobj).any():
        raise ValueError("the brain mask is empty on the working grid")
    box = mask_bounding_box(np.asarray(work_mask.dataobj), affine, margin_mm=10.0)
    work, work_mask = crop(work, box), crop(work_mask, box, np.uint8)

    data = np.asarray(work.dataobj, dtype=np.float32)
    inside = np.asarray(work_mask.dataobj) > 0
    # N4 works on log intensities: keep them positive, and truncate bright outliers (vessels, fat)
    # that would otherwise dominate the histogram sharpening (fitting input only).
    high = float(np.percentile(data[inside], 99.9))
    low = max(high * 1e-3, float(np.percentile(data[inside], 0.5)))
    if not high > 0:
        raise ValueError("no positive intensities inside the brain mask")
    fit_input = new_image(np.clip(data, low, high), work.affine)

    shrink = max(1, int(round(fit_resolution_mm / float(grid_spacing(work.affine).min()))))
    with private_tempdir():
        field_ants = ants.n4_bias_field_correction(
            to_ants(fit_input, ants), mask=to_ants(work_mask, ants), shrink_factor=shrink,
            convergence={"iters": list(iterations), "tol": 1e-7}, spline_param=float(spline_distance_mm),
            return_bias_field=True)
    field_work = from_ants(field_ants).get_fdata(dtype=np.float32)
    if not np.isfinite(field_work).all() or field_work[inside].min() <= 0:
        raise ValueError("N4 returned a non-positive or non-finite bias field")
    log_field = np.log(np.maximum(field_work, 1e-6))
    log_field -= log_field[inside].mean()
    log_native = resample_to_grid(new_image(log_field, work.affine), img.shape[:3], img.affine, order=1,
                                  antialias=False, mode="nearest")
    field = np.exp(np.asarray(log_native.dataobj, dtype=np.float32))
    corrected = np.asarray(img.dataobj, dtype=np.float32) / field
    LOGGER.debug("N4: working grid %s, shrink %d, field range %.3f-%.3f in the brain", work.shape, shrink,
                 float(np.exp(log_field[inside].min())), float(np.exp(log_field[inside].max())))
    return new_image(corrected, img.affine), new_image(field, img.affine)
