"""Jacobian-modulated tissue maps on the template grids (the VBM inputs).

For a template-grid point ``y``, the ``anat2std`` transform gives the native point ``T(y)``
(affine and SyN parts composed).  The modulated map is

    m(y) = p(T(y)) * det(dT/dy)(y),

so that ``sum(m) * template voxel volume = integral of p over native space = native tissue
volume``: the map is in mL of tissue per mL of template and its total is the subject's tissue
volume, whatever the head size (the affine part is included on purpose).

``T`` is composed by ``antsApplyTransforms`` into one displacement field on the output grid;
its Jacobian determinant is computed here with central differences in physical (mm) units, so
the code's meaning does not depend on ITK's conventions for direction matrices.  Before sampling,
native maps are Gaussian-smoothed to the output voxel size (box-equivalent), so a 1 mm map is
not point-sampled onto a 2 mm grid (which would alias and bias the sums).
"""

from __future__ import annotations

import logging
import numbers
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ._runtime import check_nthreads, import_ants, private_tempdir, to_ants
from .grid import grid_spacing, new_image, resample_to_grid
from .register import apply_transform

__all__ = [
    "FWHM_TO_SIGMA",
    "composed_displacement",
    "jacobian_from_displacement",
    "jacobian_determinant",
    "warp_and_modulate",
    "modulate",
    "smooth_fwhm",
]

LOGGER = logging.getLogger("brainage.anat.modulate")

FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))

_LPS = np.diag([-1.0, -1.0, 1.0])


def _jacobian_of_field(field_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """det(I + du/dp) of a displacement field ``u`` (LPS mm vectors, shape X x Y x Z x 3)."""
    # p_lps = M @ index, with M the grid's voxel-to-LPS linear part
    m_inv = np.linalg.inv(_LPS @ np.asarray(affine, dtype=float)[:3, :3])
    grads = np.empty(field_lps.shape[:3] + (3, 3), dtype=np.float64)
    for comp in range(3):
        per_index = np.gradient(field_lps[..., comp].astype(np.float64), axis=(0, 1, 2))
        # du_c/dp = sum_k du_c/di_k * di_k/dp
        grads[..., comp, :] = np.stack(per_index, axis=-1) @ m_inv
    grads += np.eye(3)
    return np.linalg.det(grads).astype(np.float32)


def composed_displacement(xfm: str | os.PathLike, reference: nib.spatialimages.SpatialImage, *,
                          omp_nthreads: int = 1) -> nib.Nifti1Image:
    """All parts of an ANTs transform composed into one displacement field on ``reference``'s grid.

    Parameters
    ----------
    xfm : path
        Transform mapping ``reference``-space points to the other space (``anat2std`` for the
        template grids): composite ``.h5``, displacement field or affine ``.mat``.
    reference : nibabel image
        Grid of the field.
    omp_nthreads : int, default 1
        ITK threads.

    Returns
    -------
    nibabel.Nifti1Image
        float32, shape ``reference.shape + (3,)``: displacement vectors in ITK's LPS mm
        (``T(p) = p + u(p)`` in LPS coordinates), as antsApplyTransforms composes them.
    """
    if not Path(xfm).is_file():
        raise FileNotFoundError(f"transform {xfm} does not exist")
    ants = import_ants(check_nthreads(omp_nthreads))
    ref_ants = to_ants(new_image(np.zeros(reference.shape[:3], np.float32), reference.affine), ants)
    with private_tempdir() as tmp:
        composed = ants.apply_transforms(ref_ants, ref_ants, transformlist=[str(xfm)],
                                         compose=str(Path(tmp) / "composed_"))
        if composed is None or not Path(composed).is_file():
            raise RuntimeError(f"antsApplyTransforms could not compose {xfm}")
        field = ants.image_read(composed).numpy()
    if field.shape != tuple(reference.shape[:3]) + (3,):
        raise RuntimeError(f"unexpected composed field shape {field.shape}")
    return new_image(field, reference.affine)


def jacobian_from_displacement(field: nib.spatialimages.SpatialImage,
                               reference: nib.spatialimages.SpatialImage | None = None) -> nib.Nifti1Image:
    """Jacobian determinant ``det(I + du/dp)`` of a displacement field (central differences, mm).

    Parameters
    ----------
    field : nibabel image
        From :func:`composed_displacement` (LPS vectors, shape X x Y x Z x 3).
    reference : nibabel image, optional
        Another grid (e.g. 1.5 mm) to evaluate the determinant on: the field is first interpolated
        trilinearly onto it.  antsApplyTransforms interpolates SyN fields trilinearly too, so this
        matches composing on ``reference`` directly (to 1e-5 on IXI data) at a fraction of the cost.

    Returns
    -------
    nibabel.Nifti1Image
        float32 determinant on ``reference`` (default: the field's grid).
    """
    data = np.asarray(field.dataobj, dtype=np.float32)
    if data.ndim != 4 or data.shape[3] != 3:
        raise ValueError(f"field must have shape X x Y x Z x 3, got {data.shape}")
    affine = field.affine
    if reference is not None:
        data = np.stack([np.asarray(resample_to_grid(new_image(data[..., c], field.affine), reference.shape[:3],
                                                     reference.affine, order=1, antialias=False,
                                                     mode="nearest").dataobj) for c in range(3)], axis=-1)
        affine = reference.affine
    return new_image(_jacobian_of_field(data, affine), affine)


def jacobian_determinant(xfm: str | os.PathLike, reference: nib.spatialimages.SpatialImage, *,
                         omp_nthreads: int = 1) -> nib.Nifti1Image:
    """Jacobian determinant of an ANTs transform (all its parts composed) on ``reference``'s grid.

    Parameters
    ----------
    xfm : path
        See :func:`composed_displacement`.
    reference : nibabel image
        Output grid.
    omp_nthreads : int, default 1
        ITK threads.

    Returns
    -------
    nibabel.Nifti1Image
        float32; > 1 where the other space is larger (a native brain bigger than the template).
    """
    return jacobian_from_displacement(composed_displacement(xfm, reference, omp_nthreads=omp_nthreads))


def smooth_fwhm(img: nib.spatialimages.SpatialImage, fwhm_mm: float) -> nib.Nifti1Image:
    """Gaussian smoothing with an isotropic FWHM in mm (sum preserved; edges reflect).

    Parameters
    ----------
    img : nibabel image
    fwhm_mm : float
        Full width at half maximum, > 0.

    Returns
    -------
    nibabel.Nifti1Image
        float32.
    """
    if isinstance(fwhm_mm, bool) or not isinstance(fwhm_mm, numbers.Real) or not fwhm_mm > 0:
        raise ValueError(f"fwhm_mm must be a positive number, got {fwhm_mm!r}")
    sigma = float(fwhm_mm) * FWHM_TO_SIGMA / grid_spacing(img.affine)
    data = ndi.gaussian_filter(np.asarray(img.dataobj, dtype=np.float32), sigma, mode="constant")
    return new_image(data, img.affine)


def warp_and_modulate(tpm: nib.spatialimages.SpatialImage, anat2std_xfm: str | os.PathLike,
                      reference: nib.spatialimages.SpatialImage, jacobian: nib.spatialimages.SpatialImage, *,
                      omp_nthreads: int = 1) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Warp a native probability map to ``reference``'s grid; return it plain and Jacobian-modulated.

    Parameters
    ----------
    tpm : nibabel image
        Native tissue probability map.
    anat2std_xfm : path
        T1w-to-template transform.
    reference : nibabel image
        Template grid (e.g. ``bidsapp.templates.get_template(1.5).t1w``).
    jacobian : nibabel image
        :func:`jacobian_determinant` of ``anat2std_xfm`` on that grid.
    omp_nthreads : int, default 1
        ITK threads.

    Returns
    -------
    warped : nibabel.Nifti1Image
        float32 probability on the template grid (anti-aliased, trilinear).
    modulated : nibabel.Nifti1Image
        ``warped * jacobian`` (mL tissue per mL template); its sum times the voxel volume equals
        the native tissue volume.
    """
    if tuple(jacobian.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"jacobian {jacobian.shape} is not on the reference grid {reference.shape[:3]}")
    warped = apply_transform(tpm, anat2std_xfm, reference, antialias=True, omp_nthreads=omp_nthreads)
    data = np.asarray(warped.dataobj, dtype=np.float32) * np.asarray(jacobian.dataobj, dtype=np.float32)
    return warped, new_image(data, reference.affine)


def modulate(tpm: nib.spatialimages.SpatialImage, anat2std_xfm: str | os.PathLike,
             reference: nib.spatialimages.SpatialImage, *, jacobian: nib.spatialimages.SpatialImage | None = None,
             omp_nthreads: int = 1) -> nib.Nifti1Image:
    """Jacobian-modulated map of a native probability map on ``reference``'s grid.

    Parameters
    ----------
    tpm : nibabel image
        Native tissue probability map.
    anat2std_xfm : path
        T1w-to-template transform.
    reference : nibabel image
        Template grid.
    jacobian : nibabel image, optional
        :func:`jacobian_determinant` on that grid, when already computed.
    omp_nthreads : int, default 1
        ITK threads.

    Returns
    -------
    nibabel.Nifti1Image
        See :func:`warp_and_modulate`.
    """
    if jacobian is None:
        jacobian = jacobian_determinant(anat2std_xfm, reference, omp_nthreads=omp_nthreads)
    return warp_and_modulate(tpm, anat2std_xfm, reference, jacobian, omp_nthreads=omp_nthreads)[1]
