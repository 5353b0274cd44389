"""Input preparation of seed 002 (Hofmann et al., MLens): pruned, uint8-compressed MNI-space T1w.

The participant level writes the brain-masked T1w on the 2 mm template grid
(``*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz``).  From it:

1. **scale** — intensities are divided by the ``reference_percentile`` (99th) of the brain voxels
   and multiplied by 255, so that scans from different scanners share one range (the paper's
   FreeSurfer images were already on a 0-255 scale; ours are N4-corrected raw intensities);
2. **clip** at ``clip_factor`` x 255 (1.5 x 255 = 382.5, the paper's 383) and re-normalise to
   0-255;
3. **region** (MLens type ii) — keep one region of a partition of the template grid:
   ``cerebellum`` (Neuromorphometrics cerebellum labels), ``subcortical`` (Harvard–Oxford
   subcortical structures, incl. brain stem and lateral ventricles, outside the cerebellum) and
   ``cortical`` (everything else: cerebral cortex and white matter); ``whole`` keeps all;
4. **resample** to ``resolution_mm`` when it is coarser than 2 mm (anti-aliased trilinear on the
   template grid of that resolution; reduced CPU configurations);
5. **prune** to a fixed bounding box: the box of the template brain mask (its part in the
   region) grown by ``margin_voxels`` (2) on every side;
6. **store** as uint8 (the paper's compression); the network sees these values (0-255) as
   floats, as the paper's Keras models did.  Not dividing by 255 matters: with Glorot
   initialisation, zero hidden biases and the output bias at the mean age, the initial output
   spread scales with the input, and inputs in 0-1 leave it 255 times smaller, so the
   networks barely move in the first hundreds of Adam steps.

Why the box comes from the template and not from the largest brain of the training data (the
paper's rule): every participant-level MNI-space brain is registered to this template, so the
template brain mask is where the largest brain lies up to registration error; a box fixed by
the template is the same for every dataset and every installation, so a shipped model needs no
dataset statistics to prepare its input.  Brain voxels outside the box (a registration
failure, or an unusually large head) are cut off; :func:`prepare_mni_input` reports the share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import ImageError
from ._spec import SpecTable
from .base import Volume

__all__ = ["MLENS_REGIONS", "MNIPrunedSpec", "mni_region_masks", "pruning_box", "prune",
           "unprune", "scale_to_uint8", "prepare_mni_input", "to_network_input",
           "relevance_to_template", "MNI_T1W_ENTITIES"]

LOGGER = logging.getLogger("brainage.transforms")

#: Regions of MLens type ii (``whole`` = the whole brain, type i).
MLENS_REGIONS = ("whole", "cortical", "subcortical", "cerebellum")
#: Entities of the participant-level input: ``<prefix>_space-…_res-2_desc-preproc_T1w.nii.gz``.
MNI_T1W_ENTITIES = {"space": "MNI152NLin2009aSym", "res": "2", "desc": "preproc", "suffix": "T1w"}
_SOURCE_RES = 2.0  # the participant level writes the MNI-space T1w on the 2 mm template grid


@dataclass(frozen=True)
class MNIPrunedSpec(SpecTable):
    """Parameters of the seed-002 input preparation.

    Parameters
    ----------
    resolution_mm : float
        Grid of the network input (paper: 2 mm; reduced CPU configurations: 4 mm).
    region : str
        One of :data:`MLENS_REGIONS`.
    margin_voxels : int
        Margin of the pruning box around the template brain (paper: 2).
    clip_factor : float
        Clip at ``clip_factor * 255`` after scaling (paper: 1.5).
    reference_percentile : float
        Brain-voxel percentile scaled to 255.
    """

    resolution_mm: float = 2.0
    region: str = "whole"
    margin_voxels: int = 2
    clip_factor: float = 1.5
    reference_percentile: float = 99.0

    def __post_init__(self) -> None:
        res = self.resolution_mm
        if isinstance(res, bool) or not isinstance(res, (int, float)) or not _SOURCE_RES <= res <= 8:
            raise ValueError(f"resolution_mm must be a number in [2, 8] (the inputs are on the "
                             f"2 mm grid), got {res!r}")
        object.__setattr__(self, "resolution_mm", float(res))
        if self.region not in MLENS_REGIONS:
            raise ValueError(f"region must be one of {MLENS_REGIONS}, got {self.region!r}")
        if isinstance(self.margin_voxels, bool) or not isinstance(self.margin_voxels, int) \
                or self.margin_voxels < 0:
            raise ValueError(f"margin_voxels must be an integer >= 0, got {self.margin_voxels!r}")
        if not float(self.clip_factor) >= 1.0:
            raise ValueError(f"clip_factor must be >= 1, got {self.clip_factor!r}")
        if not 50.0 <= float(self.reference_percentile) <= 100.0:
            raise ValueError(f"reference_percentile must be in [50, 100], got "
                             f"{self.reference_percentile!r}")


@lru_cache(maxsize=1)
def _regions_2mm() -> dict[str, np.ndarray]:
    from ..atlases import load_cerebellum_mask, load_harvard_oxford
    from ..templates import get_template

    reference = get_template(_SOURCE_RES).mask
    cerebellum = load_cerebellum_mask(reference)
    labels, table = load_harvard_oxford(reference)
    sub_labels = table.loc[table["atlas"] == "subcortical", "index"].to_numpy()
    subcortical = np.isin(np.asarray(labels.dataobj), sub_labels) & ~cerebellum
    cortical = ~cerebellum & ~subcortical
    return {"whole": np.ones_like(cortical), "cortical": cortical, "subcortical": subcortical,
            "cerebellum": cerebellum}


def _template(resolution_mm: float):
    from ..templates import get_template

    return get_template(resolution_mm)


def mni_region_masks() -> dict[str, np.ndarray]:
    """The region partition on the 2 mm template grid (see the module docstring).

    Returns
    -------
    dict of str to ndarray of bool
        One mask per name of :data:`MLENS_REGIONS`; ``cortical``, ``subcortical`` and
        ``cerebellum`` are disjoint and cover the grid, ``whole`` is the full grid.
    """
    return {k: v.copy() for k, v in _regions_2mm().items()}


def _downsample(data: np.ndarray, resolution_mm: float) -> np.ndarray:
    """2 mm template-grid array onto the template grid of ``resolution_mm`` (anti-aliased)."""
    if resolution_mm == _SOURCE_RES:
        return data
    from ..anat.grid import new_image, resample_to_grid

    src = _template(_SOURCE_RES)
    dst = _template(resolution_mm)
    img = new_image(np.asarray(data, dtype=np.float32), src.affine)
    return resample_to_grid(img, dst.shape, dst.affine, order=1, antialias=True).get_fdata(
        dtype=np.float32)


@lru_cache(maxsize=16)
def _box(resolution_mm: float, region: str, margin: int) -> tuple[tuple[int, int], ...]:
    brain = np.asarray(_template(_SOURCE_RES).mask.dataobj) > 0
    inside = (brain & _regions_2mm()[region]).astype(np.float32)
    # any template voxel the region's brain touches after resampling counts
    inside = _downsample(inside, resolution_mm) > 0.01
    if not inside.any():
        raise ValueError(f"region {region!r} is empty on the template grid")
    box = []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((max(0, int(hits[0]) - margin), min(inside.shape[axis], int(hits[-1]) + 1 + margin)))
    return tuple(box)


def pruning_box(spec: MNIPrunedSpec) -> tuple[slice, slice, slice]:
    """Slices of the fixed pruning box on the template grid of ``spec.resolution_mm``.

    The box of the template brain mask within ``spec.region``, grown by ``spec.margin_voxels``
    and clipped to the grid.

    Examples
    --------
    >>> box = pruning_box(MNIPrunedSpec())
    >>> tuple(s.stop - s.start for s in box)
    (77, 94, 80)
    """
    return tuple(slice(a, b) for a, b in _box(spec.resolution_mm, spec.region, spec.margin_voxels))


def prune(data: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The box's part of a template-grid array (a copy)."""
    return np.array(data[tuple(box)])


def unprune(values: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """Put a pruned array back on the full grid (``fill`` outside the box)."""
    values = np.asarray(values)
    expected = tuple(s.stop - s.start for s in box)
    if values.shape != expected:
        raise ValueError(f"values have shape {values.shape}, the box {expected}")
    out = np.full(tuple(shape), fill, dtype=values.dtype)
    out[tuple(box)] = values
    return out


def scale_to_uint8(data: np.ndarray, *, reference: float, clip_factor: float = 1.5) -> np.ndarray:
    """``data * 255 / reference``, clipped at ``clip_factor * 255``, re-normalised to uint8.

    Examples
    --------
    >>> scale_to_uint8(np.array([0.0, 50.0, 100.0, 150.0, 400.0]), reference=100.0)
    array([  0,  85, 170, 255, 255], dtype=uint8)
    """
    if not reference > 0:
        raise ValueError(f"reference must be > 0, got {reference!r}")
    top = 255.0 * float(clip_factor)
    scaled = np.clip(np.asarray(data, dtype=np.float64) * (255.0 / reference), 0.0, top)
    return np.rint(scaled * (255.0 / top)).astype(np.uint8)


def _load_on_template_grid(std_t1w) -> np.ndarray:
    from ..anat.grid import data_on_grid

    img = nib.load(str(std_t1w)) if isinstance(std_t1w, (str, Path)) else std_t1w
    if len(img.shape) != 3 and img.shape[3:] != (1,):  # a singleton 4th axis is dropped
        raise ImageError(f"{std_t1w}: expected a 3D MNI-space T1w, got shape {img.shape}")
    tpl = _template(_SOURCE_RES)
    data, resampled = data_on_grid(img, tpl.shape, tpl.affine)
    if resampled:
        LOGGER.warning("%s is not on the 2 mm %s grid; resampling it", std_t1w, MNI_T1W_ENTITIES["space"])
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data


def prepare_mni_input(std_t1w, spec: MNIPrunedSpec) -> Volume:
    """The network input of one participant-level MNI-space T1w (see the module docstring).

    Parameters
    ----------
    std_t1w : path or nibabel image
        ``*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz`` (brain-masked).
    spec : MNIPrunedSpec

    Returns
    -------
    Volume
        uint8 data in the pruning box, with the box's affine (world positions kept); its history
        records the reference intensity and the share of brain voxels outside the box.

    Raises
    ------
    ImageError
        When the image has no brain voxel.
    """
    data = _load_on_template_grid(std_t1w)
    brain = data > 0
    if not brain.any():
        raise ImageError(f"{std_t1w}: the MNI-space T1w has no brain voxel (all zero)")
    reference = float(np.percentile(data[brain], spec.reference_percentile))
    if not reference > 0:
        raise ImageError(f"{std_t1w}: brain intensities are not positive")
    top = 255.0 * spec.clip_factor
    # steps 1-2 in float (quantised once, at the end); step 3: region on the 2 mm grid
    scaled = np.clip(data * (255.0 / reference), 0.0, top) * (255.0 / top)
    scaled[~_regions_2mm()[spec.region]] = 0.0
    scaled = _downsample(scaled, spec.resolution_mm)
    box = pruning_box(spec)
    total = float(scaled.sum())
    pruned = prune(scaled, box)
    outside = max(0.0, 1.0 - float(pruned.sum()) / total) if total > 0 else 0.0
    if outside > 0.01:
        LOGGER.warning("%s: %.1f%% of the brain signal lies outside the MLens pruning box "
                       "(registration problem?)", std_t1w, 100 * outside)
    affine = _template(spec.resolution_mm).affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in box], dtype=float)
    volume = Volume(np.clip(np.rint(pruned), 0, 255).astype(np.uint8), affine)
    return volume.with_data(volume.data, record=("MNIPruned", {
        **spec.to_dict(), "reference_intensity": reference, "signal_outside_box": outside}))


def to_network_input(volume: Volume | np.ndarray) -> np.ndarray:
    """float32 network input of a prepared volume: its uint8 values (0-255), not rescaled."""
    data = volume.data if isinstance(volume, Volume) else np.asarray(volume)
    return data.astype(np.float32)


def relevance_to_template(relevance: np.ndarray, spec: MNIPrunedSpec) -> nib.Nifti1Image:
    """A relevance map of the pruned input on the full 2 mm template grid (MNI space).

    The map is put back into the full grid of ``spec.resolution_mm``; a coarser grid is then
    interpolated onto the 2 mm grid and divided by the volume ratio, so the map still sums to
    the same total (relevance is additive over voxels).

    Returns
    -------
    nibabel.Nifti1Image
        float32 on the 2 mm template grid.
    """
    from ..anat.grid import new_image
    from ..explain.guided_backprop import map_to_grid

    coarse = _template(spec.resolution_mm)
    full = unprune(np.asarray(relevance, dtype=np.float32), pruning_box(spec), coarse.shape)
    fine = _template(_SOURCE_RES)
    if spec.resolution_mm != _SOURCE_RES:
        full = map_to_grid(full, coarse.affine, fine.shape, fine.affine, order=1)
        full *= (_SOURCE_RES / spec.resolution_mm) ** 3
    return new_image(full.astype(np.float32), fine.affine)
