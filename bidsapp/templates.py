"""The MNI152 template bundled with nilearn, at 1, 1.5 and 2 mm (nothing is downloaded).

The template is the ICBM 2009a *nonlinear symmetric* MNI152 template (Fonov et al., 2009, 2011)
as shipped inside nilearn: brain-only T1w, GM and WM probability maps at 1 mm (197 x 233 x 189,
uint8 0-255).  Its space is named :data:`TEMPLATE_SPACE` (``MNI152NLin2009aSym``); it is *not*
``MNI152NLin2009cAsym`` nor FSL's ``MNI152NLin6Asym``.

Derived images (same definitions at every resolution):

* ``t1w``: the template T1w scaled to 0-1 (as :func:`nilearn.datasets.load_mni152_template`);
* ``mask``: ``t1w > 0.2`` (as :func:`nilearn.datasets.load_mni152_brain_mask`), uint8;
* ``gm``, ``wm``: the probability maps scaled to 0-1;
* ``csf``: nilearn ships no CSF map, so the CSF prior is ``clip(mask - gm - wm, 0, 1)``: inside the
  brain mask the three priors then sum to exactly 1 (``gm + wm`` never exceeds 1 in these maps).

Coarser grids share the 1 mm grid's origin (the centre of voxel 0 at RAS (-98, -134, -72) mm) and
cover its field of view: ``shape = floor(196, 232, 188 / r) + 1``, i.e. 99 x 117 x 95 at 2 mm and
131 x 155 x 126 at 1.5 mm.  They are made by box-equivalent Gaussian anti-aliasing and trilinear
sampling, and kept in memory (one copy per process and resolution).
"""

from __future__ import annotations

import functools
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import ImageError

__all__ = [
    "TEMPLATE_SPACE",
    "TEMPLATE_RESOLUTIONS_MM",
    "TEMPLATE_CITATION",
    "TemplateImages",
    "TemplateFiles",
    "resolution_label",
    "template_grid",
    "get_template",
    "write_template",
]

#: BIDS/TemplateFlow-style name of the space (the template that really is bundled).
TEMPLATE_SPACE = "MNI152NLin2009aSym"
#: Resolutions (mm) the pipeline writes outputs at; :func:`get_template` accepts any in [1, 8].
TEMPLATE_RESOLUTIONS_MM = (1.0, 1.5, 2.0)
#: How to cite the template.
TEMPLATE_CITATION = ("Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL (2009). Unbiased nonlinear "
                     "average age-appropriate brain templates from birth to adulthood. NeuroImage 47:S102; "
                     "Fonov V et al. (2011). Unbiased average age-appropriate atlases for pediatric studies. "
                     "NeuroImage 54(1):313-327.")

_MASK_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask default, on the 0-1 scaled T1w


@dataclass(frozen=True)
class TemplateImages:
    """Template images on one grid (all share ``affine`` and ``shape``).

    Attributes
    ----------
    resolution_mm : float
    t1w, mask, gm, wm, csf : nibabel.Nifti1Image
        float32 in 0-1 (``mask`` uint8 0/1).
    """

    resolution_mm: float
    t1w: nib.Nifti1Image
    mask: nib.Nifti1Image
    gm: nib.Nifti1Image
    wm: nib.Nifti1Image
    csf: nib.Nifti1Image

    @property
    def tpms(self) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image]:
        """The tissue priors in the pipeline's order (GM, WM, CSF)."""
        return self.gm, self.wm, self.csf

    @property
    def affine(self) -> np.ndarray:
        return self.t1w.affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1w.shape


@dataclass(frozen=True)
class TemplateFiles:
    """Paths of the template images written by :func:`write_template`."""

    resolution_mm: float
    t1w: Path
    mask: Path
    gm: Path
    wm: Path
    csf: Path


def _check_resolution(resolution_mm: object) -> float:
    if isinstance(resolution_mm, bool) or not isinstance(resolution_mm, numbers.Real):
        raise TypeError(f"resolution_mm must be a number, got {type(resolution_mm).__name__}")
    value = float(resolution_mm)
    if not 1.0 <= value <= 8.0:
        raise ValueError(f"resolution_mm must be between 1 and 8 mm, got {value}")
    return round(value, 4)


def resolution_label(resolution_mm: float) -> str:
    """BIDS ``res-`` label of a resolution: ``2.0 -> "2"``, ``1.5 -> "1p5"``."""
    return f"{_check_resolution(resolution_mm):g}".replace(".", "p")


@functools.lru_cache(maxsize=1)
def _native() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1 mm T1w, GM, WM (scaled 0-1, float32) and their affine, read from nilearn's data."""
    from nilearn import datasets

    arrays = []
    affine = None
    for path in (datasets.MNI152_FILE_PATH, datasets.GM_MNI152_FILE_PATH, datasets.WM_MNI152_FILE_PATH):
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any read failure means a broken installation
            raise ImageError(f"cannot read the bundled template {path}: {exc}; reinstall nilearn") from exc
        if affine is not None and not np.allclose(img.affine, affine):
            raise ImageError(f"bundled template {path} is not on the same grid as the T1w template")
        affine = img.affine
        arrays.append(data / 255.0 if data.max() > 1.0 else data)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ImageError("expected the bundled MNI152 template at 1 mm in RAS voxel order")
    arrays[0] = arrays[0] / arrays[0].max()
    return arrays[0], arrays[1], arrays[2], np.asarray(affine, dtype=float)


def template_grid(resolution_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the template grid at ``resolution_mm`` (see the module docstring).

    Parameters
    ----------
    resolution_mm : float
        Isotropic voxel size, 1 to 8 mm.

    Returns
    -------
    shape : tuple of 3 int
    affine : ndarray, shape (4, 4)

    Examples
    --------
    >>> template_grid(2.0)[0]
    (99, 117, 95)
    """
    res = _check_resolution(resolution_mm)
    t1, _, _, affine = _native()
    shape = tuple(int(np.floor((n - 1) / res + 1e-6)) + 1 for n in t1.shape)
    out = affine.copy()
    out[:3, :3] = np.eye(3) * res
    return shape, out


def get_template(resolution_mm: float = 2.0) -> TemplateImages:
    """The template images on the ``resolution_mm`` grid (cached in memory).

    Parameters
    ----------
    resolution_mm : float, default 2.0
        Isotropic voxel size, 1 to 8 mm (1, 1.5 and 2 are the pipeline's).

    Returns
    -------
    TemplateImages

    Raises
    ------
    ImageError
        If nilearn's bundled files cannot be read.
    """
    return _build_template(_check_resolution(resolution_mm))


@functools.lru_cache(maxsize=4)
def _build_template(res: float) -> TemplateImages:
    from .anat.grid import new_image, resample_to_grid

    t1, gm, wm, affine = _native()
    shape, dst_affine = template_grid(res)
    images = []
    for data in (t1, gm, wm):
        native = new_image(data, affine)
        if res == 1.0:
            images.append(native)
        else:
            resampled = resample_to_grid(native, shape, dst_affine, order=1, antialias=True)
            images.append(new_image(np.clip(resampled.get_fdata(dtype=np.float32), 0, 1), dst_affine))
    t1_img, gm_img, wm_img = images
    mask = (t1_img.get_fdata(dtype=np.float32) > _MASK_THRESHOLD).astype(np.uint8)
    csf = np.clip(mask - gm_img.get_fdata(dtype=np.float32) - wm_img.get_fdata(dtype=np.float32), 0.0, 1.0)
    return TemplateImages(res, t1_img, new_image(mask, dst_affine, np.uint8), gm_img, wm_img,
                          new_image(csf, dst_affine))


def write_template(resolution_mm: float, out_dir: str | os.PathLike) -> TemplateFiles:
    """Write the template images (gzipped NIfTI) into ``out_dir``, reusing complete earlier copies.

    Files are named ``tpl-MNI152NLin2009aSym_res-<label>_{desc-brain_T1w, desc-brain_mask,
    label-GM_probseg, label-WM_probseg, label-CSF_probseg}.nii.gz``.  Use a cache folder inside the
    work directory: nothing is ever written into the installed package.

    Parameters
    ----------
    resolution_mm : float
        Isotropic voxel size, 1 to 8 mm.
    out_dir : path
        Destination folder (created).

    Returns
    -------
    TemplateFiles
    """
    res = _check_resolution(resolution_mm)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tpl-{TEMPLATE_SPACE}_res-{resolution_label(res)}_"
    names = {"t1w": "desc-brain_T1w", "mask": "desc-brain_mask", "gm": "label-GM_probseg",
             "wm": "label-WM_probseg", "csf": "label-CSF_probseg"}
    paths = {key: out / f"{stem}{name}.nii.gz" for key, name in names.items()}
    if not all(p.is_file() for p in paths.values()):
        images = get_template(res)
        for key, path in paths.items():
            # write-then-rename, so a concurrent reader never sees half a file
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
            getattr(images, key).to_filename(tmp)
            os.replace(tmp, path)
    return TemplateFiles(res, **paths)
