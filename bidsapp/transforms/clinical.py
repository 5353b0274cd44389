"""Input preparation of seed 004 (Kim et al.): clinical thick-slice T1w for densenet-clinical.

From a skull-stripped T1w (the participant-level ``desc-preproc_T1w`` times ``desc-brain_mask``):

1. 3D scans (axial spacing below ``thick_slice_threshold_mm``) are sliced into synthetic 2D
   axial scans keeping every ``k``-th slice, ``k`` the smallest integer multiple of the axial
   spacing reaching ``slice_gap_mm`` (7 mm); each of the ``k`` offsets is one synthetic scan.
   Real thick-slice scans skip this step.
2. interpolation (trilinear) to an isotropic grid of ``spacing_mm`` aligned with the scan's
   own axes: no registration;
3. z-normalisation on the 1st-99th percentile non-background voxels, background back to 0,
   clip at the 99.9th percentile;
4. crop or zero-pad to ``shape`` voxels around the centre of the brain's bounding box.

Optionally (``thick_view_spacings_mm``, this project's addition), a 3D scan also gets views
re-acquired as contiguous thick axial slabs (partial-volume averaging over the slab, see
:class:`~bidsapp.transforms.SimulateThickSlices`), which the paper's thin-slice subsampling
does not model; training on them makes predictions robust to real thick-slice scans.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ImageError
from .augmentation import RandomFlip, RandomGamma, RandomIntensityScale, RandomShift
from .base import Compose, Volume
from .intensity import PercentileZNormalise
from .spatial import CropOrPad, ResampleToSpacing, ThickSliceSimulation, axial_axis, slicing_step

__all__ = ["ClinicalInputSpec", "load_skull_stripped", "slicing_offsets", "prepare_view",
           "prepare_views", "background_fraction", "clinical_augmentation"]

LOGGER = logging.getLogger("brainage.transforms")


@dataclass(frozen=True)
class ClinicalInputSpec:
    """Parameters of the seed-004 input preparation and augmentation.

    Parameters
    ----------
    spacing_mm : float
        Isotropic voxel size of the network input (seed: 2 mm).
    shape : (int, int, int)
        Network input shape in voxels, RAS order (seed: 80 x 120 x 40 = 160 x 240 x 80 mm).
    slice_gap_mm : float
        Minimum gap between synthetic axial slices (seed: 7 mm).
    thick_slice_threshold_mm : float
        Scans with at least this axial spacing are treated as real thick-slice scans.
    lower_percentile, upper_percentile, clip_percentile : float
        Normalisation percentiles (seed: 1, 99, 99.9).
    max_background_fraction : float
        Training excludes inputs with a larger fraction of background voxels (seed: 0.92).
    thick_view_spacings_mm : tuple of float
        Extra views of 3D scans re-acquired as contiguous thick slabs of these spacings
        (empty = the paper's views only).
    shift_mm : (float, float, float)
        Largest random shift per axis (seed: 10, 10, 2 voxels of 2 mm = 20, 20, 4 mm).
    flip_p : float
        Probability of the sagittal mirror.
    gamma_range, scale_range : (float, float)
        Ranges of the random gamma and intensity factor.
    """

    spacing_mm: float = 2.0
    shape: tuple[int, int, int] = (80, 120, 40)
    slice_gap_mm: float = 7.0
    thick_slice_threshold_mm: float = 4.0
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    clip_percentile: float = 99.9
    max_background_fraction: float = 0.92
    thick_view_spacings_mm: tuple[float, ...] = ()
    shift_mm: tuple[float, float, float] = (20.0, 20.0, 4.0)
    flip_p: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.3)
    scale_range: tuple[float, float] = (0.7, 1.3)

    def __post_init__(self) -> None:
        for name in ("spacing_mm", "slice_gap_mm", "thick_slice_threshold_mm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        shape = tuple(self.shape)
        if len(shape) != 3 or any(isinstance(s, bool) or int(s) != s or s < 8 for s in shape):
            raise ValueError(f"shape must be three ints >= 8, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        if len(tuple(self.shift_mm)) != 3:
            raise ValueError(f"shift_mm must have three values, got {self.shift_mm!r}")
        object.__setattr__(self, "shift_mm", tuple(float(s) for s in self.shift_mm))
        object.__setattr__(self, "gamma_range", tuple(float(s) for s in self.gamma_range))
        spacings = tuple(float(s) for s in self.thick_view_spacings_mm)
        if any(not s >= self.thick_slice_threshold_mm for s in spacings):
            raise ValueError(f"thick_view_spacings_mm must be >= thick_slice_threshold_mm "
                             f"({self.thick_slice_threshold_mm}), got {spacings!r}")
        object.__setattr__(self, "thick_view_spacings_mm", spacings)
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        if not 0 < self.max_background_fraction <= 1:
            raise ValueError(f"max_background_fraction must be in (0, 1], "
                             f"got {self.max_background_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ClinicalInputSpec":
        """Build from :meth:`to_dict` output (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown input parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_skull_stripped(t1w: str | Path, mask: str | Path) -> Volume:
    """Load a T1w and its brain mask, reorient to RAS and zero everything outside the brain.

    Parameters
    ----------
    t1w, mask : path
        The participant-level ``desc-preproc_T1w`` and ``desc-brain_mask`` (same grid).

    Returns
    -------
    Volume

    Raises
    ------
    ImageError
        When a file cannot be read, is not 3D, or the two grids differ.
    """
    import nibabel as nib

    try:
        image = Volume.from_nifti(nib.load(str(t1w)))
        brain = Volume.from_nifti(nib.load(str(mask)))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise ImageError(f"cannot read {t1w} / {mask}: {exc}") from exc
    if image.shape != brain.shape or not np.allclose(image.affine, brain.affine, atol=1e-3):
        raise ImageError(f"T1w {t1w} and mask {mask} are not on the same grid "
                         f"({image.shape} vs {brain.shape})")
    inside = brain.data > 0.5
    if not inside.any():
        raise ImageError(f"brain mask {mask} is empty")
    data = np.where(inside, np.clip(image.data, 0, None), 0).astype(np.float32)
    return image.with_data(data, record=("SkullStrip", {"mask": str(mask)}))


def slicing_offsets(volume: Volume, spec: ClinicalInputSpec) -> list[int | None]:
    """Offsets of the synthetic 2D scans of a 3D volume, or ``[None]`` for a thick-slice scan."""
    axial = float(volume.zooms[axial_axis(volume.affine)])
    if axial >= spec.thick_slice_threshold_mm:
        return [None]
    return list(range(slicing_step(axial, spec.slice_gap_mm)))


def prepare_view(volume: Volume, spec: ClinicalInputSpec, offset: int | None) -> Volume:
    """One network input: optional synthetic slicing at ``offset``, resampling, normalisation, crop.

    Parameters
    ----------
    volume : Volume
        Skull-stripped T1w (see :func:`load_skull_stripped`).
    spec : ClinicalInputSpec
    offset : int or None
        Slicing offset (see :func:`slicing_offsets`); ``None`` skips the slicing.

    Returns
    -------
    Volume
        ``spec.shape`` array whose affine maps it to the scanner space of ``volume``.
    """
    if offset is not None:
        volume = ThickSliceSimulation(spec.slice_gap_mm, offset)(volume)
    volume = ResampleToSpacing(spec.spacing_mm)(volume)
    volume = PercentileZNormalise(spec.lower_percentile, spec.upper_percentile,
                                  spec.clip_percentile)(volume)
    return CropOrPad(spec.shape, centre="foreground")(volume)


def prepare_views(volume: Volume, spec: ClinicalInputSpec,
                  offsets: Sequence[int | None] | None = None) -> list[Volume]:
    """Network inputs of one scan: every slicing offset (or the given ones), plus the thick-slab
    views of ``spec.thick_view_spacings_mm`` when the scan is 3D and ``offsets`` is not given."""
    from .spatial import SimulateThickSlices

    automatic = offsets is None
    offsets = slicing_offsets(volume, spec) if automatic else list(offsets)
    views = [prepare_view(volume, spec, offset) for offset in offsets]
    if automatic and offsets != [None]:
        views += [prepare_view(SimulateThickSlices(s)(volume), spec, None)
                  for s in spec.thick_view_spacings_mm]
    return views


def background_fraction(view: Volume) -> float:
    """Fraction of zero voxels in a prepared input."""
    return float(np.mean(view.data == 0))


def clinical_augmentation(spec: ClinicalInputSpec) -> Compose:
    """The seed-004 training augmentation for inputs at ``spec.spacing_mm``.

    Shifts are given in mm in the spec and rounded to voxels here, so the same physical
    augmentation applies at 2 mm and at a coarser CPU grid.
    """
    max_shift = [int(round(mm / spec.spacing_mm)) for mm in spec.shift_mm]
    return Compose([RandomShift(max_shift), RandomFlip((0,), spec.flip_p),
                    RandomGamma(spec.gamma_range), RandomIntensityScale(spec.scale_range)])
