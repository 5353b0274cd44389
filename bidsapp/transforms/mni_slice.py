"""Input preparation of seed 001 (Ijishakin et al., diffusion autoencoder): the medial axial slice.

The paper (appendix B) registers every scan affinely to the MNI-152 template, resamples it to
130^3 voxels, corrects the bias field (N4) and skull-strips it (HD-BET).  It then takes the
medial axial slice, resizes it to 128^2 and normalises its values to [0, 1].

Here the participant level has already done the first steps.  Its
``*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz`` is N4-corrected, brain-masked and
on the 2 mm template grid.  That image is registered **non-linearly**, whereas the paper
registered affinely.  The slices are therefore better aligned than the paper's, and they keep
less of the differences in head size and shape that an affine registration leaves; some of the
age signal in the paper's inputs lay in those differences (the same caveat as for seed 003,
:mod:`bidsapp.transforms.mni_affine`).  From that image:

1. **resample** to a cube of ``grid_size`` (130) samples per axis over the template grid's field
   of view (trilinear).  Only the planes that are used are computed; the values are the same as
   those of the whole 130^3 volume;
2. **slice**: plane ``grid_size // 2 + slice_offset`` of that cube is the medial axial slice.
   This is a fixed MNI z: :func:`slice_z_mm`, +22.7 mm for the defaults, the level of the
   bodies of the lateral ventricles.  With ``neighbour_slices = n``, the ``n`` planes on each
   side, ``neighbour_step`` planes apart, are prepared as further views.  Training draws one
   view per scan and epoch as augmentation; prediction uses the medial view only;
3. **resize** each plane to ``size`` x ``size`` (128^2; bilinear, anti-aliased);
4. **normalise** each plane to [0, 1]: ``(v - min) / (p - min)``, clipped to [0, 1], where ``p``
   is the ``upper_percentile`` of the plane (100, the maximum: the paper's min-max scaling).

The arrays are indexed ``[x, y]`` in RAS order: the first axis runs from left to right and the
second from posterior to anterior.  :func:`view_affine` maps a pixel to MNI millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ImageError
from ._spec import SpecTable
# the MNI-space T1w is read as for seeds 002 and 003: onto the 2 mm template grid (resampled, with
# a warning, when off it), non-finite values set to 0
from .mni_pruned import _SOURCE_RES, _load_on_template_grid, _template

__all__ = ["MNISliceSpec", "slice_planes", "slice_z_mm", "view_affine", "normalise_unit",
           "prepare_slice_views"]


def _check_int(spec: object, name: str, minimum: int) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class MNISliceSpec(SpecTable):
    """Parameters of the seed-001 input preparation.

    Parameters
    ----------
    grid_size : int
        Samples per axis of the cubic resampling grid over the template's field of view
        (paper: 130).
    size : int
        Side of the prepared slice (paper: 128; reduced CPU configurations: 64).
    slice_offset : int
        Planes of the cube between the medial plane ``grid_size // 2`` and the slice used
        (positive: superior; paper: 0).
    neighbour_slices : int
        Further views on each side of the slice, used as training augmentation (paper: 0).
    neighbour_step : int
        Planes of the cube between neighbouring views.
    upper_percentile : float
        Percentile of the plane that becomes 1 (100: the maximum, as the paper's min-max).
    """

    grid_size: int = 130
    size: int = 128
    slice_offset: int = 0
    neighbour_slices: int = 0
    neighbour_step: int = 1
    upper_percentile: float = 100.0

    def __post_init__(self) -> None:
        _check_int(self, "grid_size", 8)
        _check_int(self, "size", 8)
        _check_int(self, "neighbour_slices", 0)
        _check_int(self, "neighbour_step", 1)
        if isinstance(self.slice_offset, bool) or not isinstance(self.slice_offset, int):
            raise ValueError(f"slice_offset must be an integer, got {self.slice_offset!r}")
        planes = slice_planes(self)
        if min(planes) < 0 or max(planes) >= self.grid_size:
            raise ValueError(f"the views lie on planes {min(planes)}..{max(planes)}, outside the "
                             f"cube of {self.grid_size} planes (slice_offset {self.slice_offset}, "
                             f"{self.neighbour_slices} neighbours every {self.neighbour_step})")
        value = self.upper_percentile
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 50.0 < value <= 100.0:
            raise ValueError(f"upper_percentile must be a number in (50, 100], got {value!r}")
        object.__setattr__(self, "upper_percentile", float(value))


def slice_planes(spec: MNISliceSpec) -> list[int]:
    """Planes of the cube of each view: the slice first, then its neighbours (below, above).

    Examples
    --------
    >>> slice_planes(MNISliceSpec(neighbour_slices=2, neighbour_step=3))
    [65, 62, 68, 59, 71]
    """
    centre = spec.grid_size // 2 + spec.slice_offset
    planes = [centre]
    for k in range(1, spec.neighbour_slices + 1):
        planes += [centre - k * spec.neighbour_step, centre + k * spec.neighbour_step]
    return planes


def _cube_to_template(index: np.ndarray, n: int, grid_size: int) -> np.ndarray:
    """Template voxel coordinate of cube sample ``index`` (both grids span one field of view)."""
    return (np.asarray(index, dtype=np.float64) + 0.5) * n / grid_size - 0.5


def slice_z_mm(spec: MNISliceSpec) -> list[float]:
    """MNI z (mm) of each view's plane, in the order of :func:`slice_planes`.

    Examples
    --------
    >>> [round(z, 2) for z in slice_z_mm(MNISliceSpec())]
    [22.73]
    """
    tpl = _template(_SOURCE_RES)
    k = _cube_to_template(np.array(slice_planes(spec)), tpl.shape[2], spec.grid_size)
    return [float(tpl.affine[2, 2] * v + tpl.affine[2, 3]) for v in k]


def view_affine(spec: MNISliceSpec, view: int = 0) -> np.ndarray:
    """Pixel ``(i, j)`` of a prepared view (as ``(i, j, 0, 1)``) to MNI millimetres.

    The cube resampling followed by the resize is the same as sampling the template's field of
    view on a ``size`` x ``size`` grid: pixel ``i`` lies at template voxel
    ``(i + 0.5) * n / size - 0.5``.  The third column is one plane of the resampling cube, so
    the affine is invertible and serves as the affine of a one-plane NIfTI image of the view.

    Examples
    --------
    >>> A = view_affine(MNISliceSpec())
    >>> (A @ [0, 0, 0, 1])[:3].round(2).tolist()
    [-98.23, -134.09, 22.73]
    """
    if isinstance(view, bool) or not isinstance(view, int) \
            or not 0 <= view < 1 + 2 * spec.neighbour_slices:
        raise ValueError(f"view must be an integer in [0, {2 * spec.neighbour_slices}], "
                         f"got {view!r}")
    tpl = _template(_SOURCE_RES)
    nx, ny, nz = tpl.shape
    z_index = _cube_to_template(slice_planes(spec)[view], nz, spec.grid_size)
    pixel_to_voxel = np.array([[nx / spec.size, 0, 0, 0.5 * nx / spec.size - 0.5],
                               [0, ny / spec.size, 0, 0.5 * ny / spec.size - 0.5],
                               [0, 0, nz / spec.grid_size, z_index],
                               [0, 0, 0, 1.0]])
    return tpl.affine @ pixel_to_voxel


def normalise_unit(plane: np.ndarray, upper_percentile: float = 100.0) -> np.ndarray:
    """``(plane - min) / (percentile - min)`` clipped to [0, 1]; all zero for a flat plane.

    Examples
    --------
    >>> normalise_unit(np.array([[0.0, 50.0], [100.0, 200.0]]))
    array([[0.  , 0.25],
           [0.5 , 1.  ]], dtype=float32)
    """
    plane = np.asarray(plane, dtype=np.float64)
    low = float(plane.min())
    high = (float(np.percentile(plane, upper_percentile)) if upper_percentile < 100
            else float(plane.max()))
    if not high > low:
        return np.zeros(plane.shape, dtype=np.float32)
    return np.clip((plane - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _resize(planes: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[:, None]
    if tuple(tensor.shape[2:]) == (size, size):
        return planes.astype(np.float32)
    # anti-aliased when shrinking (130 -> 128 is a shrink), plain bilinear when enlarging
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < tensor.shape[2])
    return out[:, 0].numpy()


def prepare_slice_views(std_t1w, spec: MNISliceSpec) -> list[np.ndarray]:
    """Steps 1-4 of the module docstring for one scan.

    Parameters
    ----------
    std_t1w : path or nibabel image
        The participant level's brain-masked 2 mm template-space T1w
        (``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``).
    spec : MNISliceSpec

    Returns
    -------
    list of ndarray
        One float32 ``(size, size)`` array in [0, 1] per view, the slice itself first (see
        :func:`slice_planes`), indexed ``[x, y]`` (RAS).

    Raises
    ------
    ImageError
        When the image is not 3D or has no positive brain voxel.
    """
    from scipy.ndimage import map_coordinates

    data = _load_on_template_grid(std_t1w)
    if not np.any(data > 0):
        raise ImageError(f"{std_t1w}: the MNI-space T1w has no positive brain voxel")
    nx, ny, nz = data.shape
    g = spec.grid_size
    xs = _cube_to_template(np.arange(g), nx, g)
    ys = _cube_to_template(np.arange(g), ny, g)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    planes = []
    for plane in slice_planes(spec):
        gz = np.full_like(gx, _cube_to_template(plane, nz, g))
        # trilinear; outside the template grid is background (0), as in the brain-masked image
        planes.append(map_coordinates(data, [gx, gy, gz], order=1, mode="constant", cval=0.0))
    resized = _resize(np.stack(planes), spec.size)
    return [normalise_unit(p, spec.upper_percentile) for p in resized]
