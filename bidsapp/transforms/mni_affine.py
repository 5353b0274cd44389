"""Input preparation of seed 003 (Jomsky et al., VGG8 on T1w and synthetic CBV).

The paper's scans were in MNI-152 space after an *affine* registration.  The participant level
of this app registers non-linearly (``*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``,
brain-masked, on the 2 mm template grid); that image is used here as it is, so the inputs are
better aligned than the paper's and carry less of the head-size and shape differences an affine
registration leaves (some of the age signal of the paper's inputs lies in those).  From it:

1. **normalise** — divide by the mean of the scan's top ``top_fraction`` (1 %) brain-voxel
   intensities (the paper's "modified min-max scaling"; brain voxels are the non-zero ones of
   the brain-masked image), on the 2 mm grid;
2. **resample** to ``resolution_mm`` when it is coarser than 2 mm (anti-aliased trilinear onto
   the template grid of that resolution; reduced CPU configurations);
3. **crop or zero-pad** to ``shape`` voxels: a fixed window centred on the bounding box of the
   bundled template's brain mask, the same for every scan (all are in template space).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import ImageError
from ._spec import SpecTable
from .base import Volume
# the MNI-space T1w is read as for seed 002: onto the 2 mm template grid (resampled, with a
# warning, when off it), non-finite values set to 0
from .mni_pruned import _SOURCE_RES, _load_on_template_grid, _template

__all__ = ["MNIAffineSpec", "top_fraction_mean", "template_window", "crop_or_pad_window",
           "prepare_vgg_input"]


@dataclass(frozen=True)
class MNIAffineSpec(SpecTable):
    """Parameters of the seed-003 input preparation.

    Parameters
    ----------
    resolution_mm : float
        Grid of the network input, 2 to 8 mm (full configuration: 2 mm; reduced CPU: 4 mm).
    shape : (int, int, int)
        Network input shape in voxels (RAS order); every side >= 32 (five max-pools of 2).
    top_fraction : float
        Share of the brightest brain voxels whose mean intensity becomes 1 (paper: 1 %).
    """

    resolution_mm: float = 2.0
    shape: tuple[int, int, int] = (80, 96, 80)
    top_fraction: float = 0.01

    def __post_init__(self) -> None:
        # the inputs are on the 2 mm grid: never upsampled
        _set_number(self, "resolution_mm", _SOURCE_RES, 8.0, "[2, 8]")
        _set_number(self, "top_fraction", 0.0, 0.5, "(0, 0.5]", open_low=True)
        shape = tuple(self.shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 32
                                  for s in shape):
            raise ValueError(f"shape must be three ints >= 32, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)


def _set_number(spec: object, name: str, low: float, high: float, text: str,
                open_low: bool = False) -> None:
    """Check a float field of a frozen spec against its range and store it as a float."""
    value = getattr(spec, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (low < value if open_low else low <= value) or not value <= high:
        raise ValueError(f"{name} must be a number in {text}, got {value!r}")
    object.__setattr__(spec, name, float(value))


def top_fraction_mean(values: np.ndarray, fraction: float = 0.01) -> float:
    """Mean of the largest ``ceil(fraction * n)`` values (at least one).

    Examples
    --------
    >>> top_fraction_mean(np.arange(1.0, 201.0), 0.01)
    199.5
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("no values")
    k = max(1, int(np.ceil(fraction * flat.size - 1e-9)))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


@lru_cache(maxsize=8)
def template_window(resolution_mm: float, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """First voxel of the ``shape`` window centred on the template brain's bounding box.

    Examples
    --------
    >>> template_window(4.0, (40, 48, 40))
    (5, 6, 0)
    """
    brain = np.asarray(_template(resolution_mm).mask.dataobj) > 0
    start = []
    for axis, size in enumerate(shape):
        hits = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        centre = (hits[0] + hits[-1]) / 2
        start.append(int(np.floor(centre - (size - 1) / 2 + 0.5)))
    return tuple(start)


def crop_or_pad_window(data: np.ndarray, start, shape) -> np.ndarray:
    """The window ``[start, start + shape)`` of a 3D array, zero where it leaves the array.

    Examples
    --------
    >>> crop_or_pad_window(np.arange(4.0).reshape(4, 1, 1), (-1, 0, 0), (3, 1, 1)).ravel()
    array([0., 0., 1.])
    """
    data = np.asarray(data)
    before = [max(0, -int(s)) for s in start]
    after = [max(0, int(s) + int(n) - d) for s, n, d in zip(start, shape, data.shape)]
    padded = np.pad(data, list(zip(before, after)))
    index = tuple(slice(int(s) + b, int(s) + b + int(n)) for s, b, n in zip(start, before, shape))
    return np.ascontiguousarray(padded[index])


def prepare_vgg_input(std_t1w, spec: MNIAffineSpec) -> Volume:
    """Steps 1-3 of the module docstring for one scan.

    Parameters
    ----------
    std_t1w : path or nibabel image
        The participant level's brain-masked 2 mm template-space T1w
        (``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``).
    spec : MNIAffineSpec

    Returns
    -------
    Volume
        float32, ``spec.shape``; its affine is the window's on the template grid of
        ``spec.resolution_mm``, and its history holds the reference intensity and the window.

    Raises
    ------
    ImageError
        When the image is not 3D or has no positive brain voxel.
    """
    from ..anat.grid import new_image, resample_to_grid

    data = _load_on_template_grid(std_t1w)
    src = _template(_SOURCE_RES)
    brain = data > 0
    if not brain.any():
        raise ImageError(f"{std_t1w}: the MNI-space T1w has no positive brain voxel")
    reference = top_fraction_mean(data[brain], spec.top_fraction)
    scaled = np.where(brain, data / reference, 0.0).astype(np.float32)
    dst = _template(spec.resolution_mm)
    if spec.resolution_mm != _SOURCE_RES:
        scaled = resample_to_grid(new_image(scaled, src.affine), dst.shape, dst.affine, order=1,
                                  antialias=True).get_fdata(dtype=np.float32)
    start = template_window(spec.resolution_mm, spec.shape)
    affine = dst.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.asarray(start, dtype=float)
    volume = Volume(crop_or_pad_window(scaled, start, spec.shape).astype(np.float32), affine)
    return volume.with_data(volume.data, record=("MNIAffine", {
        **spec.to_dict(), "reference_intensity": reference, "window_start": list(start)}))
