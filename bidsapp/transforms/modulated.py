"""Input preparation of seed 000 (Popescu et al., local brain age): smoothed modulated GM and WM.

The paper's inputs were SPM12 DARTEL-normalised, Jacobian-modulated GM and WM maps in MNI space,
resampled to 1.5 mm and smoothed with a 4 mm FWHM kernel.  The participant level writes the
equivalents (ANTs SyN instead of DARTEL) on the 1.5 mm and 2 mm template grids:
``*_space-MNI152NLin2009aSym_res-{1p5,2}_label-{GM,WM}_desc-modulated_probseg.nii.gz``.  From them:

1. **read** the maps of the finest participant grid not finer than ``resolution_mm``
   (1.5 mm for 1.5 mm, else 2 mm), checked to lie on that template grid (resampled if not);
2. **smooth** each map with a Gaussian of ``fwhm_mm`` (4 mm) FWHM (zero outside the field of
   view, as SPM's ``spm_smooth``);
3. **resample** to ``resolution_mm`` when it is coarser than the source grid (anti-aliased
   trilinear; reduced CPU configurations);
4. **crop** to the bounding box of the template brain mask on that grid.  No intensity
   normalisation: modulated maps are already in mL of tissue per mL of template.

The brain mask of every step after this one (block sampling in training, the voxels that are
tiled and averaged at inference) is the *template* brain mask on the model's grid: every map is
registered to the template, the mask is the same for every participant (so voxelwise group
statistics compare the same voxels), and there is no participant mask on the 1.5 mm grid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import ImageError, InputMissingError
from ._spec import SpecTable

__all__ = ["ModulatedInputSpec", "ModulatedInput", "MODULATED_TISSUES", "modulated_paths",
           "smooth_fwhm", "brain_box", "brain_mask", "prepare_modulated_input",
           "box_to_template", "to_template_grid"]

LOGGER = logging.getLogger("brainage.transforms")

#: Input channels, in order.
MODULATED_TISSUES = ("GM", "WM")
_SOURCE_GRIDS = {1.5: "1p5", 2.0: "2"}  # grids the participant level writes modulated maps on
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class ModulatedInputSpec(SpecTable):
    """Parameters of the seed-000 input preparation.

    Parameters
    ----------
    resolution_mm : float
        Grid of the network input: 1.5 (paper) or any value in [2, 8] (read from the 2 mm maps).
    fwhm_mm : float
        Gaussian smoothing FWHM (paper: 4 mm); 0 for none.
    """

    resolution_mm: float = 1.5
    fwhm_mm: float = 4.0

    def __post_init__(self) -> None:
        res = self.resolution_mm
        if isinstance(res, bool) or not isinstance(res, (int, float)) or not (
                res == 1.5 or 2.0 <= res <= 8.0):
            raise ValueError(f"resolution_mm must be 1.5 or a number in [2, 8] (the participant "
                             f"level writes modulated maps at 1.5 and 2 mm), got {res!r}")
        object.__setattr__(self, "resolution_mm", float(res))
        fwhm = self.fwhm_mm
        if isinstance(fwhm, bool) or not isinstance(fwhm, (int, float)) or not 0 <= fwhm <= 20:
            raise ValueError(f"fwhm_mm must be a number in [0, 20], got {fwhm!r}")
        object.__setattr__(self, "fwhm_mm", float(fwhm))

    @property
    def source_resolution_mm(self) -> float:
        """Grid of the participant-level maps that are read (1.5 or 2 mm)."""
        return 1.5 if self.resolution_mm < 2.0 else 2.0


@dataclass(frozen=True)
class ModulatedInput:
    """The prepared input of one scan.

    Attributes
    ----------
    data : ndarray, shape (2, X, Y, Z)
        Smoothed modulated GM and WM in the brain box (float32).
    mask : ndarray of bool, shape (X, Y, Z)
        Template brain mask in the box.
    affine : ndarray, shape (4, 4)
        Voxel-to-MNI affine of the box.
    """

    data: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


def modulated_paths(anat_dir: str | Path, prefix: str, spec: ModulatedInputSpec, *,
                    check: bool = True) -> tuple[Path, ...]:
    """The participant-level modulated GM and WM maps that ``spec`` reads.

    Parameters
    ----------
    anat_dir : path
        The ``anat`` folder of one participant (session) in the derivatives.
    prefix : str
        Entity prefix of the T1w (``sub-01_ses-A``).
    spec : ModulatedInputSpec
    check : bool
        Raise when a map does not exist.

    Raises
    ------
    InputMissingError
        When a map is missing (derivatives of an older brainage version).

    Examples
    --------
    >>> gm, wm = modulated_paths("/d/sub-01/anat", "sub-01", ModulatedInputSpec(), check=False)
    >>> gm.name
    'sub-01_space-MNI152NLin2009aSym_res-1p5_label-GM_desc-modulated_probseg.nii.gz'
    """
    from ..derivatives import SourceEntities, derivative_path
    from ..templates import TEMPLATE_SPACE

    source = SourceEntities.from_path(f"{prefix}_T1w.nii.gz")
    res = _SOURCE_GRIDS[spec.source_resolution_mm]
    paths = tuple(Path(anat_dir) / derivative_path(".", source, space=TEMPLATE_SPACE, res=res,
                                                   label=t, desc="modulated", suffix="probseg").name
                  for t in MODULATED_TISSUES)
    missing = [p for p in paths if check and not p.is_file()]
    if missing:
        raise InputMissingError(f"{missing[0]} is missing: the local-unet model reads the "
                                "modulated GM/WM maps of `brainage ... participant`; rerun the "
                                "participant level")
    return paths


def smooth_fwhm(data: np.ndarray, fwhm_mm: float, voxel_mm: float) -> np.ndarray:
    """Gaussian smoothing with a FWHM in mm (zero outside the array, as SPM).

    Examples
    --------
    >>> delta = np.zeros((41, 41, 41), np.float32); delta[20, 20, 20] = 1
    >>> out = smooth_fwhm(delta, 4.0, 0.5)
    >>> x = (np.arange(41) - 20) * 0.5
    >>> sd = float(np.sqrt((out.sum(axis=(1, 2)) * x ** 2).sum()))
    >>> round(float(sd * 2 * np.sqrt(2 * np.log(2))), 2)     # the FWHM, back in mm
    4.0
    """
    from scipy import ndimage

    if fwhm_mm <= 0:
        return np.asarray(data, dtype=np.float32)
    sigma = fwhm_mm * _FWHM_TO_SIGMA / voxel_mm
    return ndimage.gaussian_filter(np.asarray(data, dtype=np.float32), sigma, mode="constant",
                                   cval=0.0, truncate=4.0)


def _template(resolution_mm: float):
    from ..templates import get_template

    return get_template(resolution_mm)


@lru_cache(maxsize=8)
def _box(resolution_mm: float) -> tuple[tuple[int, int], ...]:
    brain = np.asarray(_template(resolution_mm).mask.dataobj) > 0
    box = []
    for axis in range(3):
        hits = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def brain_box(spec: ModulatedInputSpec) -> tuple[slice, slice, slice]:
    """Bounding box of the template brain mask on the grid of ``spec.resolution_mm``.

    Examples
    --------
    >>> tuple(s.stop - s.start for s in brain_box(ModulatedInputSpec(resolution_mm=2.0)))
    (73, 90, 78)
    """
    return tuple(slice(a, b) for a, b in _box(spec.resolution_mm))


def brain_mask(spec: ModulatedInputSpec) -> np.ndarray:
    """The template brain mask in :func:`brain_box` (bool, a copy)."""
    return np.asarray(_template(spec.resolution_mm).mask.dataobj)[brain_box(spec)] > 0


def _box_affine(spec: ModulatedInputSpec) -> np.ndarray:
    affine = _template(spec.resolution_mm).affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in brain_box(spec)], dtype=float)
    return affine


def _load_on_grid(path, resolution_mm: float) -> np.ndarray:
    from ..anat.grid import data_on_grid

    try:
        img = nib.load(str(path)) if isinstance(path, (str, Path)) else path
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for broken files
        raise ImageError(f"cannot read {path}: {exc}") from exc
    if len(img.shape) != 3 and img.shape[3:] != (1,):  # a singleton 4th axis is dropped
        raise ImageError(f"{path}: expected a 3D modulated map, got shape {img.shape}")
    tpl = _template(resolution_mm)
    data, resampled = data_on_grid(img, tpl.shape, tpl.affine)
    if resampled:
        LOGGER.warning("%s is not on the %g mm template grid; resampling it", path, resolution_mm)
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)


def prepare_modulated_input(paths, spec: ModulatedInputSpec) -> ModulatedInput:
    """The network input of one scan (see the module docstring).

    Parameters
    ----------
    paths : sequence of path or nibabel image
        Modulated GM and WM maps on the 1.5 mm or 2 mm template grid
        (:func:`modulated_paths`).
    spec : ModulatedInputSpec

    Raises
    ------
    ImageError
        Unreadable maps, or maps without tissue inside the brain mask.
    """
    from ..anat.grid import new_image, resample_to_grid

    if len(paths) != len(MODULATED_TISSUES):
        raise ValueError(f"expected {len(MODULATED_TISSUES)} maps (GM, WM), got {len(paths)}")
    src_res = spec.source_resolution_mm
    src, dst = _template(src_res), _template(spec.resolution_mm)
    box, channels = brain_box(spec), []
    for path in paths:
        data = smooth_fwhm(_load_on_grid(path, src_res), spec.fwhm_mm, src_res)
        if spec.resolution_mm != src_res:
            data = resample_to_grid(new_image(data, src.affine), dst.shape, dst.affine, order=1,
                                    antialias=True).get_fdata(dtype=np.float32)
        channels.append(data[box])
    mask = brain_mask(spec)
    data = np.stack(channels).astype(np.float32)
    if not np.any(data[:, mask] > 0):
        raise ImageError(f"{paths[0]}: the modulated maps hold no tissue inside the brain mask")
    return ModulatedInput(data=data, mask=mask, affine=_box_affine(spec))


def box_to_template(values: np.ndarray, spec: ModulatedInputSpec,
                    fill: float = float("nan")) -> nib.Nifti1Image:
    """A map of the brain box on the full template grid of ``spec.resolution_mm``."""
    from ..anat.grid import new_image

    tpl = _template(spec.resolution_mm)
    values = np.asarray(values, dtype=np.float32)
    box = brain_box(spec)
    if values.shape != tuple(s.stop - s.start for s in box):
        raise ValueError(f"values have shape {values.shape}, the brain box "
                         f"{tuple(s.stop - s.start for s in box)}")
    full = np.full(tpl.shape, fill, dtype=np.float32)
    full[box] = values
    return new_image(full, tpl.affine)


def to_template_grid(values: np.ndarray, spec: ModulatedInputSpec,
                     resolution_mm: float = 2.0) -> nib.Nifti1Image:
    """A brain-box map (NaN outside the mask) on the full template grid of ``resolution_mm``.

    On the model's own grid the values are copied; otherwise they are interpolated
    (anti-aliased trilinear) with normalised weights, so voxels near the mask edge average only
    voxels that have a value.  Voxels outside the template mask of the target grid are NaN.
    """
    from ..anat.grid import new_image, resample_to_grid

    img = box_to_template(values, spec)
    if float(resolution_mm) == spec.resolution_mm:
        return img
    src, dst = _template(spec.resolution_mm), _template(resolution_mm)
    data = np.asarray(img.dataobj, dtype=np.float32)
    known = np.isfinite(data)

    def resample(array: np.ndarray) -> np.ndarray:
        return resample_to_grid(new_image(array, src.affine), dst.shape, dst.affine, order=1,
                                antialias=True).get_fdata(dtype=np.float32)

    weight = resample(known.astype(np.float32))
    total = resample(np.where(known, data, 0.0).astype(np.float32))
    inside = (np.asarray(dst.mask.dataobj) > 0) & (weight > 1e-3)
    out = np.full(dst.shape, np.nan, dtype=np.float32)
    out[inside] = total[inside] / weight[inside]
    return new_image(out, dst.affine)
