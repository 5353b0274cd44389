"""Registration to the template with ANTs (Avants et al., 2008): affine + SyN, and transform application.

The brain-masked, bias-corrected T1w on the 2 mm working grid (cropped to the brain) is registered
to the brain-only template at 2 mm: centre-of-mass initialisation, an affine stage
(global correlation, 2100/1200/1200 iterations at shrink 4/2/2) and a SyN stage (Mattes mutual
information, 40/20 iterations at shrink 4/2 -- antspyx's ``"SyN"`` recipe).  The affine stage
uses global correlation instead of antspyx's default Mattes MI because, with more than one ITK
thread, sparse-sampled Mattes MI gives a different result on every run even with a fixed seed;
with correlation (same-modality T1w to T1w), a given ``random_seed`` gives bit-identical transforms.

Both directions are written as ANTs composite HDF5 transforms (``*Composite.h5``): apply
``anat2std`` to images in T1w space to bring them to the template (``antsApplyTransforms -i T1w
-r template -t anat2std``), ``std2anat`` for the way back.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from ._runtime import ants_seed, check_nthreads, check_seed, from_ants, import_ants, private_tempdir, to_ants
from .grid import antialias_sigma, crop, mask_bounding_box, new_image, resample_to_grid, working_grid

__all__ = [
    "SIMILARITY_METRIC",
    "register_to_template",
    "apply_transform",
    "registration_similarity",
]

LOGGER = logging.getLogger("brainage.anat.register")

#: Definition of ``registration_similarity`` in the QC file.
SIMILARITY_METRIC = ("Pearson correlation between the brain-masked T1w warped to MNI152NLin2009aSym "
                     "(2 mm) and the template T1w, over the template brain mask (1 = identical "
                     "up to a linear intensity change)")


def _brain_on_work_grid(img, mask, resolution_mm):
    shape, affine = working_grid(img, resolution_mm)
    same = tuple(img.shape) == tuple(shape) and np.allclose(img.affine, affine)
    work = img if same else resample_to_grid(img, shape, affine, order=1, antialias=True)
    work_mask = mask if same else resample_to_grid(mask, shape, affine, order=1, antialias=True)
    inside = np.asarray(work_mask.dataobj, dtype=np.float32) > 0.5
    brain = new_image(np.where(inside, np.asarray(work.dataobj, dtype=np.float32), 0.0), affine)
    return crop(brain, mask_bounding_box(inside, affine, margin_mm=10.0))


def register_to_template(t1w: nib.spatialimages.SpatialImage, mask: nib.spatialimages.SpatialImage,
                         out_dir: str | os.PathLike, *, resolution_mm: float = 2.0, random_seed: int = 0,
                         omp_nthreads: int = 1, reg_iterations: tuple[int, ...] = (40, 20, 0)
                         ) -> tuple[Path, Path]:
    """Register a bias-corrected T1w (masked by ``mask``) to the template; write both transforms.

    Parameters
    ----------
    t1w : nibabel image
        Bias-corrected T1w (native grid).
    mask : nibabel image
        Its brain mask.
    out_dir : path
        Folder for ``anat2std_Composite.h5`` and ``std2anat_Composite.h5`` (created).
    resolution_mm : float, default 2.0
        Working and template grid spacing.
    random_seed : int, default 0
        Seed of ANTs' sampling (results are bit-identical for a given seed and thread count).
    omp_nthreads : int, default 1
        ITK threads.
    reg_iterations : tuple of int, default (40, 20, 0)
        SyN iterations per level (shrink factors 4, 2, 1).

    Returns
    -------
    anat2std_xfm, std2anat_xfm : Path
    """
    from ..templates import get_template

    omp_nthreads = check_nthreads(omp_nthreads)
    random_seed = check_seed(random_seed)
    if tuple(t1w.shape) != tuple(mask.shape[:3]):
        raise ValueError(f"t1w {t1w.shape} and mask {mask.shape} differ in shape")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ants = import_ants(omp_nthreads)
    moving = _brain_on_work_grid(t1w, mask, resolution_mm)
    fixed = get_template(resolution_mm).t1w
    with private_tempdir() as tmp, ants_seed(random_seed):
        prefix = str(Path(tmp) / "reg_")
        result = ants.registration(to_ants(fixed, ants), to_ants(moving, ants), type_of_transform="SyN",
                                   aff_metric="GC", syn_metric="mattes", reg_iterations=tuple(reg_iterations),
                                   outprefix=prefix, write_composite_transform=True, verbose=False)
        fwd, inv = Path(result["fwdtransforms"]), Path(result["invtransforms"])
        if not (fwd.is_file() and inv.is_file()):
            raise RuntimeError("ANTs registration did not write its composite transforms")
        anat2std, std2anat = out / "anat2std_Composite.h5", out / "std2anat_Composite.h5"
        shutil.move(fwd, anat2std)
        shutil.move(inv, std2anat)
    return anat2std, std2anat


def apply_transform(img: nib.spatialimages.SpatialImage, xfm: str | os.PathLike,
                    reference: nib.spatialimages.SpatialImage, *, interpolation: str = "linear",
                    antialias: bool = True, omp_nthreads: int = 1) -> nib.Nifti1Image:
    """Resample ``img`` onto ``reference``'s grid through an ANTs transform.

    Parameters
    ----------
    img : nibabel image
        3D image to move.
    xfm : path
        Transform mapping ``reference`` space points to ``img`` space points (e.g. ``anat2std``
        to bring a T1w-space image to the template).
    reference : nibabel image
        Output grid.
    interpolation : {"linear", "nearestNeighbor", "genericLabel", "bSpline"}, default "linear"
    antialias : bool, default True
        Gaussian pre-smoothing of ``img`` when ``reference`` is coarser (box-equivalent; keeps
        sums of probability maps consistent); ignored for label interpolation.
    omp_nthreads : int, default 1
        ITK threads.

    Returns
    -------
    nibabel.Nifti1Image
        float32 on ``reference``'s grid.
    """
    from scipy import ndimage as ndi

    if interpolation not in ("linear", "nearestNeighbor", "genericLabel", "bSpline"):
        raise ValueError(f"interpolation must be linear, nearestNeighbor, genericLabel or bSpline, "
                         f"got {interpolation!r}")
    if not Path(xfm).is_file():
        raise FileNotFoundError(f"transform {xfm} does not exist")
    ants = import_ants(omp_nthreads)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if antialias and interpolation in ("linear", "bSpline"):
        sigma = antialias_sigma(img.affine, reference.affine)
        if sigma.max() > 0:
            data = ndi.gaussian_filter(data, sigma, mode="nearest")
    ref = new_image(np.zeros(reference.shape[:3], np.float32), reference.affine)
    with private_tempdir():
        warped = ants.apply_transforms(to_ants(ref, ants), to_ants(new_image(data, img.affine), ants),
                                       transformlist=[str(xfm)], interpolator=interpolation)
    return from_ants(warped)


def registration_similarity(warped: nib.spatialimages.SpatialImage,
                            template_t1w: nib.spatialimages.SpatialImage,
                            template_mask: nib.spatialimages.SpatialImage) -> float:
    """Pearson correlation of a warped T1w and the template T1w inside the template brain mask.

    See :data:`SIMILARITY_METRIC`.  Higher is better; rank scans by it to find failed registrations.

    Returns
    -------
    float
        ``nan`` when either image is constant inside the mask.
    """
    a = np.asarray(warped.dataobj, dtype=np.float64)
    b = np.asarray(template_t1w.dataobj, dtype=np.float64)
    m = np.asarray(template_mask.dataobj) > 0
    if not (a.shape == b.shape == m.shape):
        raise ValueError(f"shapes differ: warped {a.shape}, template {b.shape}, mask {m.shape}")
    x, y = a[m], b[m]
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
