"""Input checks for a T1w image: refuse what cannot work, flag what works less well, reorient to RAS.

Refused with :class:`~bidsapp.errors.ImageError` (one line naming the file and what to do):

* unreadable, corrupt or truncated files (a gzip stream is checked to its CRC, which reading the
  voxels alone does not reach); complex or RGB data; a singular affine;
* 2D images, 4D images with more than one volume (a trailing singleton 4th dimension is dropped);
* voxel sizes below 0.3 mm or above 8 mm, a field of view under 60 mm along any axis;
* constant (e.g. all-zero) images, and images with fewer than 16 distinct values (masks, labels);
* images with more than 1 % non-finite (NaN/Inf) voxels.

Repaired with a warning: up to 1 % non-finite voxels are set to 0 (some converters write NaN
outside the reconstructed field of view; they carry no signal); intensities above 1e6 (a wrong
``scl_slope``, or values beyond float32) are divided by a power of ten -- every stage and model
normalises intensities, so only the scale of ``desc-preproc_T1w`` changes.

Warned about: a header whose qform and sform disagree (the sform is used, as nibabel does), or
that has neither (the orientation is then unknown).

Flagged (processing goes on; the flags and warnings reach the QC file):

* ``thick_slice``: largest spacing >= 4 mm (clinical 2D stacks) -- tissue maps are unreliable;
* ``anisotropic``: largest / smallest spacing > 1.5;
* ``oblique``: voxel axes more than 1 degree off the world axes (handled exactly: all stages
  use the full affine).

A missing file (or a symbolic link to one, e.g. unfetched DataLad content) raises
:class:`~bidsapp.errors.InputMissingError`.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import ImageError, InputMissingError
from .grid import new_image

__all__ = [
    "MIN_VOXEL_MM",
    "MAX_VOXEL_MM",
    "THICK_SLICE_MM",
    "T1wInspection",
    "check_t1w",
    "load_t1w",
    "reorient_to_ras",
    "reorient_like",
]

LOGGER = logging.getLogger("brainage.anat.checks")

MIN_VOXEL_MM = 0.3
MAX_VOXEL_MM = 8.0
THICK_SLICE_MM = 4.0
_ANISOTROPY_RATIO = 1.5
_OBLIQUE_DEG = 1.0
_MIN_FOV_MM = 60.0
_MAX_NONFINITE_FRACTION = 0.01
_MIN_DISTINCT_VALUES = 16
_MAX_INTENSITY = 1e6
_RESCALED_PEAK = 1e4
_XFORM_TOLERANCE_MM = 0.5


@dataclass
class T1wInspection:
    """What the checks found out about one T1w (JSON-serialisable via :meth:`as_dict`).

    Attributes
    ----------
    path : str
    shape : list of int
        3D shape (after dropping a trailing singleton dimension).
    voxel_size_mm : list of float
    orientation : str
        Voxel axis codes of the input, e.g. ``"PSR"`` (RAS output is ``"RAS"``).
    obliquity_deg : float
        Largest angle between a voxel axis and its closest world axis.
    thick_slice, anisotropic, oblique : bool
    nonfinite_voxels : int
        Non-finite voxels set to 0.
    warnings : list of str
    """

    path: str
    shape: list[int]
    voxel_size_mm: list[float]
    orientation: str
    obliquity_deg: float
    thick_slice: bool
    anisotropic: bool
    oblique: bool
    nonfinite_voxels: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain-dict copy (for JSON)."""
        return asdict(self)


def _refuse(path: Path, problem: str, advice: str) -> ImageError:
    return ImageError(f"{path}: {problem}. {advice}")


def _check_gzip(path: Path) -> None:
    """Read a gzip file to its end: only there are its CRC and length checked."""
    try:
        with open(path, "rb") as raw:
            if raw.read(2) != b"\x1f\x8b":
                return
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise _refuse(path, f"is corrupt or truncated (gzip stream: {type(exc).__name__}: {exc})",
                      "Copy or convert the file again (`gzip -t` tests a file)") from exc


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Read header and data; any failure becomes an ImageError naming the file."""
    if not path.exists():
        if path.is_symlink():
            raise InputMissingError(
                f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist. If the "
                "dataset is a DataLad/git-annex dataset, fetch the content first (datalad get)")
        raise InputMissingError(f"{path}: T1w image not found")
    if path.stat().st_size == 0:
        raise _refuse(path, "is an empty (0-byte) file", "Copy or convert the scan again")
    _check_gzip(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise _refuse(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})",
                      "Re-export the scan from DICOM (e.g. dcm2niix) and check the file is complete") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _refuse(path, f"is a {type(img).__name__}, not NIfTI", "Convert it to NIfTI (.nii/.nii.gz)")
    if np.dtype(img.get_data_dtype()).kind not in "biuf":
        raise _refuse(path, f"has non-scalar voxel type {img.get_data_dtype()}",
                      "Provide a real-valued (magnitude) T1w image")
    try:
        data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - truncated gzip: EOFError, zlib.error, OSError...
        raise _refuse(path, f"is corrupt or truncated ({type(exc).__name__}: {exc})",
                      "Copy or convert the file again") from exc
    return img, data


def _geometry(path: Path, img: nib.Nifti1Image, data: np.ndarray) -> np.ndarray:
    """Validate dimensionality, returning 3D data."""
    shape = data.shape
    if data.ndim > 3 and all(n == 1 for n in shape[3:]):
        data = data.reshape(shape[:3])
    if data.ndim == 4:
        raise _refuse(path, f"is 4D with {shape[3]} volumes",
                      "brainage needs one 3D T1w per file: extract one volume (e.g. fslroi) and rerun")
    if data.ndim != 3 or min(data.shape) < 2:
        raise _refuse(path, f"is not a 3D image (shape {shape})",
                      "Provide a 3D T1w volume (a single slice or a 2D image cannot be processed)")
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise _refuse(path, "has a singular or non-finite affine (qform/sform)",
                      "Fix the NIfTI header geometry (e.g. re-convert with dcm2niix)")
    return data


def _xform_warnings(img: nib.Nifti1Image, shape: tuple[int, ...]) -> list[str]:
    """Warnings about the header's two orientations (qform, sform)."""
    header = img.header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not qcode and not scode:
        return ["the header has neither a qform nor an sform (both codes 0): orientation and "
                "left/right are unknown; fix the header (e.g. re-convert with dcm2niix)"]
    if qform is None or sform is None:
        return []
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    gap = float(np.linalg.norm((qform - sform) @ corners, axis=0).max())
    if gap <= _XFORM_TOLERANCE_MM:
        return []
    return [f"the qform and sform of the header disagree by up to {gap:.1f} mm over the field of "
            "view; brainage uses the sform (as nibabel and FSL do): check which one is correct "
            "(e.g. fslhd) and fix the header"]


def _rescale(data: np.ndarray, warnings: list[str]) -> np.ndarray:
    """float32 data, divided by a power of ten when its peak would overflow or is implausible."""
    peak = float(np.abs(data).max()) if data.size else 0.0
    if not peak > _MAX_INTENSITY:
        return data.astype(np.float32, copy=False)
    exponent = math.ceil(math.log10(peak / _RESCALED_PEAK))
    warnings.append(f"intensities up to {peak:.3g} were divided by 1e{exponent} (check the scaling "
                    "(scl_slope) of the header; brain age does not depend on the intensity scale)")
    return (data.astype(np.float64) / 10.0 ** exponent).astype(np.float32)


def _obliquity_deg(affine: np.ndarray) -> float:
    lin = np.asarray(affine, dtype=float)[:3, :3]
    unit = lin / np.linalg.norm(lin, axis=0)
    cos = np.clip(np.abs(unit).max(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).max())


def _inspect(path: Path) -> tuple[nib.Nifti1Image, np.ndarray, T1wInspection]:
    img, data = _load(path)
    data = _geometry(path, img, data)
    zooms = np.sqrt((np.asarray(img.affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    if zooms.min() < MIN_VOXEL_MM or zooms.max() > MAX_VOXEL_MM:
        raise _refuse(path, f"has voxel size {np.round(zooms, 3).tolist()} mm, outside "
                      f"{MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm",
                      "Check the header's voxel size (units must be mm) or resample the image")
    fov = zooms * np.asarray(data.shape)
    if fov.min() < _MIN_FOV_MM:
        raise _refuse(path, f"covers only {np.round(fov, 1).tolist()} mm",
                      f"brainage needs the whole brain (at least {_MIN_FOV_MM:g} mm along each axis)")
    warnings: list[str] = _xform_warnings(img, data.shape)
    # non-finite voxels are counted in the stored type: float64 values beyond float32 are not NaN
    finite = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad:
        if n_bad > _MAX_NONFINITE_FRACTION * data.size:
            raise _refuse(path, f"has {n_bad} NaN/Inf voxels ({100 * n_bad / data.size:.1f} %)",
                          "Re-export the image; brainage repairs at most 1 % non-finite voxels")
        data = np.where(finite, data, 0)
        warnings.append(f"{n_bad} NaN/Inf voxels were set to 0")
    data = _rescale(data, warnings)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise _refuse(path, f"is constant (every voxel is {lo:g})", "Check the conversion of this scan")
    # a cheap lower bound on the distinct values: sample, as np.unique on 27 M voxels is slow
    n_values = np.unique(data.ravel()[:: max(1, data.size // 2_000_000)]).size
    if n_values < _MIN_DISTINCT_VALUES:
        raise _refuse(path, f"has only {n_values} distinct values (a mask or label image?)",
                      "Provide the T1w intensity image")
    obliquity = _obliquity_deg(img.affine)
    info = T1wInspection(
        path=str(path), shape=[int(n) for n in data.shape], voxel_size_mm=[round(float(z), 4) for z in zooms],
        orientation="".join(nib.aff2axcodes(img.affine)), obliquity_deg=round(obliquity, 3),
        thick_slice=bool(zooms.max() >= THICK_SLICE_MM),
        anisotropic=bool(zooms.max() / zooms.min() > _ANISOTROPY_RATIO),
        oblique=bool(obliquity > _OBLIQUE_DEG), nonfinite_voxels=n_bad, warnings=warnings)
    if info.thick_slice:
        warnings.append(f"thick slices ({zooms.max():.1f} mm): registration works but tissue maps, "
                        "tissue volumes and modulated maps are unreliable")
    elif info.anisotropic:
        warnings.append(f"anisotropic voxels {np.round(zooms, 2).tolist()} mm: tissue maps are smoother "
                        "along the coarse axis")
    if info.oblique:
        LOGGER.info("%s: oblique acquisition (%.1f deg), handled through the full affine", path, obliquity)
    return img, data, info


def check_t1w(path: str | os.PathLike) -> T1wInspection:
    """Check that ``path`` is a usable 3D T1w image, without processing it.

    Parameters
    ----------
    path : path-like
        The T1w NIfTI file.

    Returns
    -------
    T1wInspection
        Shape, voxel sizes, orientation, flags and warnings.

    Raises
    ------
    InputMissingError
        If the file does not exist.
    ImageError
        If the image must be refused (see the module docstring).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    return _inspect(Path(path))[2]


def reorient_to_ras(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """Reorder and flip voxel axes to the closest RAS orientation (no resampling).

    The world position of every voxel is unchanged; an oblique affine stays oblique.
    Output is float32 with qform = sform (code 1).

    Parameters
    ----------
    img : nibabel image
        3D image.

    Returns
    -------
    nibabel.Nifti1Image
    """
    if len(img.shape) != 3:
        raise ValueError(f"img must be 3D, got shape {img.shape}")
    ornt = nib.io_orientation(img.affine)
    data = nib.apply_orientation(np.asarray(img.dataobj, dtype=np.float32), ornt)
    affine = np.asarray(img.affine, dtype=float) @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    return new_image(data, affine)


def reorient_like(img: nib.spatialimages.SpatialImage, reference: nib.spatialimages.SpatialImage,
                  dtype: type | np.dtype | None = None) -> nib.Nifti1Image:
    """Undo :func:`reorient_to_ras`: bring ``img`` back to the voxel order of ``reference``.

    Parameters
    ----------
    img : nibabel image
        An image on the RAS-reoriented grid of ``reference``.
    reference : nibabel image
        The original (non-RAS) image.
    dtype : dtype, optional
        Output type (default: the type of ``img``'s data).

    Returns
    -------
    nibabel.Nifti1Image
        On the grid of ``reference``.
    """
    ornt = nib.io_orientation(reference.affine)
    back = nib.orientations.ornt_transform(nib.io_orientation(img.affine), ornt)
    data = nib.apply_orientation(np.asarray(img.dataobj), back)
    affine = np.asarray(img.affine, dtype=float) @ nib.orientations.inv_ornt_aff(back, img.shape)
    if data.shape != tuple(reference.shape[:3]) or not np.allclose(affine, reference.affine, atol=1e-4):
        raise ValueError("img is not on the RAS-reoriented grid of reference")
    return new_image(data, affine, dtype or data.dtype)


def load_t1w(path: str | os.PathLike) -> tuple[nib.Nifti1Image, T1wInspection]:
    """Check a T1w (:func:`check_t1w`) and return it reoriented to RAS as float32.

    Parameters
    ----------
    path : path-like
        The T1w NIfTI file.

    Returns
    -------
    image : nibabel.Nifti1Image
        RAS, float32, non-finite voxels set to 0.
    inspection : T1wInspection

    Raises
    ------
    InputMissingError, ImageError
        As :func:`check_t1w`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    img, data, info = _inspect(Path(path))
    for message in info.warnings:
        LOGGER.warning("%s: %s", path, message)
    return reorient_to_ras(new_image(data, img.affine)), info
