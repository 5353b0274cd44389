"""Reusable QC figures: slice mosaics with contours or overlays, saved as SVG or PNG.

The figures follow the layout of the NiPreps reportlets: one row of cuts per axis
(sagittal, coronal, axial), the cuts spread over the bounding box of a brain mask so every
panel shows brain, and outlines drawn as contours so the anatomy underneath stays visible.
Everything renders on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so no
pyplot state or interactive backend is touched (safe in worker processes and threads).

Examples
--------
>>> cuts = cuts_from_mask("sub-01_desc-brain_mask.nii.gz")            # doctest: +SKIP
>>> fig = plot_mosaic("sub-01_desc-preproc_T1w.nii.gz", cuts=cuts,    # doctest: +SKIP
...                   contours=[Contour("sub-01_desc-brain_mask.nii.gz", "red", "brain mask")])
>>> save_figure(fig, "sub-01_desc-brainmask_T1w.svg")                 # doctest: +SKIP
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import nibabel as nib
import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..derivatives import atomic_write
from ..errors import ImageError

__all__ = [
    "FIGURE_MAX_BYTES",
    "ImageLike",
    "Contour",
    "Overlay",
    "load_3d",
    "cuts_from_mask",
    "robust_range",
    "crop_to_mask",
    "plot_mosaic",
    "plot_overlay",
    "plot_slice_row",
    "save_figure",
]

LOGGER = logging.getLogger("brainage.reports.figures")

#: Largest SVG kept as SVG; bigger figures are written as PNG instead (report stays light).
FIGURE_MAX_BYTES = 1_000_000

ImageLike = Union[str, os.PathLike, nib.spatialimages.SpatialImage]

_AXES = ("x", "y", "z")
_AXIS_INDEX = {"x": 0, "y": 1, "z": 2}
_AXIS_NAMES = {"x": "sagittal", "y": "coronal", "z": "axial"}
# Inches per panel; 7 panels per row at 2 in gives a figure that reads well at page width.
_PANEL_IN = 2.0
_BG = "black"
_DISPLAY_MM = 1.0  # voxel size oblique images are resampled to for display


@dataclass(frozen=True)
class Contour:
    """An outline to draw on every panel of a mosaic.

    Parameters
    ----------
    img : path or nibabel image
        Image to contour (any grid; drawn in world coordinates).
    color : str
        Matplotlib colour.
    label : str or None
        Text for the legend under the mosaic.
    level : float
        Iso-value of the contour (0.5 outlines a binary mask).
    linewidth : float
        Line width in points.
    """

    img: ImageLike
    color: str
    label: str | None = None
    level: float = 0.5
    linewidth: float = 1.0


@dataclass(frozen=True)
class Overlay:
    """A colour-mapped image drawn over the background of a mosaic.

    Parameters
    ----------
    img : path or nibabel image
        Overlay image (any grid).
    cmap : str or None
        Matplotlib colormap; ``None`` picks ``RdBu_r`` (symmetric range) for signed data
        and ``viridis`` otherwise.
    vmin, vmax : float or None
        Colour range; ``None`` uses robust percentiles of the non-zero voxels.
    threshold : float or None
        Voxels with ``|value| < threshold`` are transparent; ``None`` hides exact zeros only.
    alpha : float
        Opacity in [0, 1].
    label : str or None
        Colour-bar label (e.g. ``'brain age (years)'``).
    symmetric : bool
        Force a range symmetric about zero (``RdBu_r``) even when the data are one-signed,
        so that the colour of zero is the same in every map of a kind (relevance maps).
    percentile : float
        Percentile of the non-zero values (of ``|value|`` for a symmetric range) that ends the
        automatic range; brighter voxels saturate.
    """

    img: ImageLike
    cmap: str | None = None
    vmin: float | None = None
    vmax: float | None = None
    threshold: float | None = None
    alpha: float = 0.8
    label: str | None = None
    symmetric: bool = False
    percentile: float = 99.5


def load_3d(img: ImageLike, *, name: str = "img") -> nib.spatialimages.SpatialImage:
    """Load ``img`` as a 3D image (a trailing singleton 4th dimension is dropped).

    Parameters
    ----------
    img : path or nibabel image
        Image or file name.
    name : str
        Parameter name used in error messages.

    Returns
    -------
    nibabel.Nifti1Image

    Raises
    ------
    ImageError
        The file cannot be read or is not 3D.
    TypeError
        ``img`` is neither a path nor a nibabel image.
    """
    if isinstance(img, (str, os.PathLike)):
        try:
            img = nib.load(os.fspath(img))
        except (OSError, nib.filebasedimages.ImageFileError) as exc:
            raise ImageError(f"{name}: cannot read image {os.fspath(img)!r}: {exc}") from exc
    elif not isinstance(img, nib.spatialimages.SpatialImage):
        raise TypeError(f"{name} must be a path or a nibabel image, got {type(img).__name__}")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise ImageError(f"{name}: expected a 3D image, got shape {shape}")
    return img


def _world_coords(img: nib.spatialimages.SpatialImage, threshold: float) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    ijk = np.argwhere(np.nan_to_num(data) > threshold)
    if ijk.size == 0:
        raise ValueError(f"mask_img has no voxel above {threshold}")
    return nib.affines.apply_affine(img.affine, ijk)


def cuts_from_mask(mask_img: ImageLike, n_cuts: int = 7, *, axes: Sequence[str] = _AXES,
                   threshold: float = 0.0, margin: float = 0.1) -> dict[str, list[float]]:
    """World coordinates of evenly spaced cuts through a mask's bounding box.

    Parameters
    ----------
    mask_img : path or nibabel image
        Brain mask (or any image whose voxels ``> threshold`` mark the region to show).
    n_cuts : int
        Cuts per axis.
    axes : sequence of {'x', 'y', 'z'}
        Axes to cut, in the order the mosaic rows appear.
    threshold : float
        Voxels above this value belong to the region.
    margin : float
        Fraction of the box extent left out at each end, so the outermost cuts still go
        through tissue rather than grazing it.

    Returns
    -------
    dict
        ``{axis: [mm, ...]}`` in scanner/world (RAS+) millimetres.

    Raises
    ------
    ValueError
        Bad arguments, or an empty mask.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> mask = nib.Nifti1Image(np.pad(np.ones((5, 5, 5)), 5).astype("uint8"), np.eye(4))
    >>> cuts_from_mask(mask, 3, axes="z", margin=0.0)
    {'z': [5.0, 7.0, 9.0]}
    """
    if not isinstance(n_cuts, (int, np.integer)) or isinstance(n_cuts, bool) or n_cuts < 1:
        raise ValueError(f"n_cuts must be a positive integer, got {n_cuts!r}")
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin!r}")
    axes = tuple(axes)
    if not axes or any(a not in _AXIS_INDEX for a in axes):
        raise ValueError(f"axes must be a non-empty sequence of 'x', 'y', 'z', got {axes!r}")
    xyz = _world_coords(load_3d(mask_img, name="mask_img"), threshold)
    cuts = {}
    for axis in axes:
        lo, hi = xyz[:, _AXIS_INDEX[axis]].min(), xyz[:, _AXIS_INDEX[axis]].max()
        pad = margin * (hi - lo)
        cuts[axis] = [round(float(v), 1) for v in np.linspace(lo + pad, hi - pad, n_cuts)]
    return cuts


def robust_range(img: ImageLike, mask_img: ImageLike | None = None,
                 percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """Intensity range from percentiles, ignoring zeros (and voxels outside a mask).

    Bias-corrected, unmasked T1w images keep a few very bright voxels (fat, vessels); a
    percentile range keeps them from washing out the brain in the figure.

    Parameters
    ----------
    img : path or nibabel image
        Image whose intensities are summarised.
    mask_img : path or nibabel image or None
        Only voxels inside this mask (same grid as ``img``) count.
    percentiles : (float, float)
        Lower and upper percentiles in [0, 100].

    Returns
    -------
    (float, float)
        ``(vmin, vmax)``; ``(0.0, 1.0)`` when no voxel is non-zero.
    """
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    img = load_3d(img)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    keep = np.isfinite(data) & (data != 0)
    if mask_img is not None:
        mask = load_3d(mask_img, name="mask_img")
        if mask.shape != img.shape:
            raise ValueError(f"mask_img shape {mask.shape} differs from img shape {img.shape}")
        keep &= np.asanyarray(mask.dataobj) > 0
    if not keep.any():
        return 0.0, 1.0
    vmin, vmax = np.percentile(data[keep], [lo_p, hi_p])
    return float(vmin), float(max(vmax, vmin + 1e-6))


def crop_to_mask(img: ImageLike, mask_img: ImageLike, margin_mm: float = 10.0
                 ) -> nib.spatialimages.SpatialImage:
    """Crop ``img`` to the bounding box of a mask plus a margin (grids may differ).

    Cropping before plotting enlarges the brain in each panel and shrinks the figure file.

    Parameters
    ----------
    img : path or nibabel image
        Image to crop (no resampling: whole voxels are kept).
    mask_img : path or nibabel image
        Region to keep; any grid (the box is computed in world coordinates).
    margin_mm : float
        Extra millimetres kept on every side.

    Returns
    -------
    nibabel image
        A view of ``img`` restricted to the box (its affine adjusted accordingly).
    """
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, got {margin_mm!r}")
    img = load_3d(img)
    xyz = _world_coords(load_3d(mask_img, name="mask_img"), 0.0)
    lo, hi = xyz.min(axis=0) - margin_mm, xyz.max(axis=0) + margin_mm
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    ijk = nib.affines.apply_affine(np.linalg.inv(img.affine), corners)
    start = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, np.array(img.shape) - 1)
    stop = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, start + 1, np.array(img.shape))
    return img.slicer[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]


def _axis_aligned(affine: np.ndarray) -> bool:
    """True when each voxel axis runs along one world axis (diagonal or permuted affine)."""
    rot = np.abs(affine[:3, :3])
    return bool(np.all(np.count_nonzero(rot > 1e-6 * rot.max(), axis=0) == 1))


def _display_grid(img: nib.spatialimages.SpatialImage,
                  reference: nib.spatialimages.SpatialImage | None = None
                  ) -> nib.spatialimages.SpatialImage:
    """``img`` on a world-aligned grid, resampled (linearly) at most once.

    nilearn reorders an oblique image to a world-aligned grid by resampling it again for
    every row and every contour, which costs minutes on a 0.8 mm oblique scan; doing it
    once here leaves nilearn only cheap axis flips.  Oblique images other than the
    background are resampled onto the (already aligned) background ``reference``.
    """
    from nilearn.image import resample_img, resample_to_img

    if _axis_aligned(img.affine):
        return img
    if not np.issubdtype(img.get_data_dtype(), np.floating):
        # Linear interpolation of labels/masks needs floats (contour at 0.5 stays smooth).
        img = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), img.affine)
    with warnings.catch_warnings():
        # Masks are resampled linearly on purpose: the 0.5 contour of the result is smooth.
        warnings.filterwarnings("ignore", message=".*[Rr]esampling binary images.*")
        if reference is None:
            # Panels are ~200 px across a ~200 mm field: finer than 1 mm adds nothing visible.
            voxel = max(float(min(img.header.get_zooms()[:3])), _DISPLAY_MM)
            return resample_img(img, target_affine=np.diag([voxel] * 3), interpolation="linear",
                                force_resample=True, copy_header=True)
        return resample_to_img(img, reference, interpolation="linear", force_resample=True,
                               copy_header=True)


def _overlay_style(overlay: Overlay) -> tuple[str, float, float]:
    """Colormap and range of an overlay, filling in the automatic choices."""
    data = np.asanyarray(load_3d(overlay.img, name="overlay").dataobj).astype(np.float32)
    values = data[np.isfinite(data) & (data != 0)]
    signed = overlay.symmetric or (values.size > 0 and values.min() < 0 < values.max())
    vmin, vmax = overlay.vmin, overlay.vmax
    if values.size and (vmin is None or vmax is None):
        if signed:
            bound = float(np.percentile(np.abs(values), overlay.percentile))
            auto = (-bound, bound)
        else:
            auto = tuple(float(v) for v in
                         np.percentile(values, [100.0 - overlay.percentile, overlay.percentile]))
        vmin = auto[0] if vmin is None else vmin
        vmax = auto[1] if vmax is None else vmax
    vmin = 0.0 if vmin is None else float(vmin)
    vmax = 1.0 if vmax is None else float(vmax)
    if vmax <= vmin:
        vmax = vmin + 1e-6
    cmap = overlay.cmap or ("RdBu_r" if signed else "viridis")
    return cmap, vmin, vmax


def plot_mosaic(background: ImageLike, *, cuts: Mapping[str, Sequence[float]],
                contours: Sequence[Contour] = (), overlay: Overlay | None = None,
                vmin: float | None = None, vmax: float | None = None,
                crop_mask: ImageLike | None = None, crop_margin_mm: float = 10.0,
                title: str | None = None) -> Figure:
    """A mosaic of cuts (one row per axis) with optional contours and a colour overlay.

    Parameters
    ----------
    background : path or nibabel image
        Anatomical image shown in grey.
    cuts : mapping
        ``{axis: [world mm, ...]}`` as returned by :func:`cuts_from_mask`; rows appear in
        the mapping's order.
    contours : sequence of Contour
        Outlines drawn on every panel; labelled ones are listed in a legend.
    overlay : Overlay or None
        Colour-mapped image drawn over the background, with a colour bar.
    vmin, vmax : float or None
        Grey range of the background; ``None`` uses :func:`robust_range`.
    crop_mask : path or nibabel image or None
        If given, the background is cropped to this mask's box (see :func:`crop_to_mask`).
    crop_margin_mm : float
        Margin kept around ``crop_mask``.
    title : str or None
        Text above the mosaic.

    Returns
    -------
    matplotlib.figure.Figure
        Unattached to pyplot; pass it to :func:`save_figure`.
    """
    # Imported here: nilearn.plotting is slow to import and only needed when drawing.
    from nilearn import plotting

    if not isinstance(cuts, Mapping) or not cuts:
        raise ValueError("cuts must be a non-empty mapping {axis: [coordinates]}")
    for axis, coords in cuts.items():
        if axis not in _AXIS_INDEX:
            raise ValueError(f"cuts keys must be 'x', 'y' or 'z', got {axis!r}")
        if len(coords) == 0:
            raise ValueError(f"cuts[{axis!r}] is empty")
    for contour in contours:
        if not isinstance(contour, Contour):
            raise TypeError(f"contours must hold Contour objects, got {type(contour).__name__}")
    if overlay is not None and not isinstance(overlay, Overlay):
        raise TypeError(f"overlay must be an Overlay or None, got {type(overlay).__name__}")

    bg = load_3d(background, name="background")
    if vmin is None or vmax is None:
        auto_min, auto_max = robust_range(bg)
        vmin = auto_min if vmin is None else vmin
        vmax = auto_max if vmax is None else vmax
    if crop_mask is not None:
        bg = crop_to_mask(bg, crop_mask, crop_margin_mm)
    bg = _display_grid(bg)
    contour_imgs = [(c, _display_grid(load_3d(c.img, name="contour"), bg)) for c in contours]
    overlay_img = (_display_grid(load_3d(overlay.img, name="overlay"), bg)
                   if overlay is not None else None)
    style = _overlay_style(overlay) if overlay is not None else None

    n_cols = max(len(c) for c in cuts.values())
    n_rows = len(cuts)
    legend = any(c.label for c in contours)
    head = 0.35 if title else 0.0
    foot = 0.35 if legend else 0.0
    width = n_cols * _PANEL_IN
    height = n_rows * _PANEL_IN + head + foot
    fig = Figure(figsize=(width, height), facecolor=_BG)
    FigureCanvasAgg(fig)
    row_h = _PANEL_IN / height
    bottom0 = foot / height
    # Leave room on the right for the colour bar when there is an overlay.
    panel_w = 0.92 if style else 1.0
    with warnings.catch_warnings():
        # Permuted/oblique affines are reordered by nilearn for display, which is what we want.
        warnings.filterwarnings("ignore", message=".*non-diagonal affine.*")
        warnings.filterwarnings("ignore", message=".*[Rr]esampl.*")
        # NaN outside the brain (voxelwise brain-age maps) becomes 0: transparent, as intended
        warnings.filterwarnings("ignore", message=".*Non-finite values detected.*")
        for row, (axis, coords) in enumerate(cuts.items()):
            ax = fig.add_axes([0.0, bottom0 + (n_rows - 1 - row) * row_h, panel_w, row_h])
            display = plotting.plot_anat(
                bg, display_mode=axis, cut_coords=[float(c) for c in coords], figure=fig,
                axes=ax, draw_cross=False, colorbar=False, annotate=True, black_bg=True,
                dim=0, vmin=vmin, vmax=vmax, cmap="gray")
            if style is not None:
                cmap, o_min, o_max = style
                threshold = overlay.threshold if overlay.threshold is not None else 1e-6
                display.add_overlay(overlay_img, cmap=cmap, vmin=o_min,
                                    vmax=o_max, threshold=threshold,
                                    transparency=overlay.alpha)
            for contour, img in contour_imgs:
                display.add_contours(img, levels=[contour.level], colors=[contour.color],
                                     linewidths=contour.linewidth)
    if title:
        fig.text(0.005, 1.0 - 0.5 * head / height, title, color="white", fontsize=12,
                 va="center", ha="left")
    labelled = [c for c in contours if c.label]
    if labelled:
        handles = [Line2D([], [], color=c.color, linewidth=2.0, label=c.label) for c in labelled]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.0, 0.5 * foot / height),
                   ncol=len(handles), frameon=False, labelcolor="white", fontsize=11,
                   handlelength=1.5)
    if style is not None:
        cmap, o_min, o_max = style
        cax = fig.add_axes([0.93, bottom0 + 0.1 * n_rows * row_h, 0.012, 0.8 * n_rows * row_h])
        bar = fig.colorbar(ScalarMappable(norm=Normalize(o_min, o_max), cmap=colormaps[cmap]),
                           cax=cax)
        bar.ax.tick_params(colors="white", labelsize=9)
        bar.outline.set_edgecolor("white")
        if overlay.label:
            bar.set_label(overlay.label, color="white", fontsize=10)
    return fig


def plot_overlay(background: ImageLike, overlay_img: ImageLike, *,
                 cuts: Mapping[str, Sequence[float]], cmap: str | None = None,
                 vmin: float | None = None, vmax: float | None = None,
                 threshold: float | None = None, alpha: float = 0.8, label: str | None = None,
                 contours: Sequence[Contour] = (), title: str | None = None,
                 crop_mask: ImageLike | None = None) -> Figure:
    """Mosaic of a colour-mapped map over an anatomical background.

    A convenience wrapper around :func:`plot_mosaic` for statistical or explanation maps.

    Parameters
    ----------
    background : path or nibabel image
        Anatomical image shown in grey.
    overlay_img : path or nibabel image
        Map to colour-code (any grid).
    cuts : mapping
        ``{axis: [world mm, ...]}`` as returned by :func:`cuts_from_mask`.
    cmap, vmin, vmax, threshold, alpha, label
        As in :class:`Overlay` (automatic colormap and range when ``None``).
    contours : sequence of Contour
        Outlines drawn on top (e.g. a mask or atlas boundary).
    title : str or None
        Text above the mosaic.
    crop_mask : path or nibabel image or None
        Crop the background to this mask's box.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    overlay = Overlay(overlay_img, cmap=cmap, vmin=vmin, vmax=vmax, threshold=threshold,
                      alpha=alpha, label=label)
    return plot_mosaic(background, cuts=cuts, contours=contours, overlay=overlay, title=title,
                       crop_mask=crop_mask)


def plot_slice_row(panels: Sequence[tuple[str, np.ndarray]], *, vmin: float = 0.0,
                   vmax: float = 1.0, diff_vmax: float | None = None,
                   diff_index: int | None = None, title: str | None = None) -> Figure:
    """One row of 2D slices side by side, e.g. an input, its reconstruction and their difference.

    Parameters
    ----------
    panels : sequence of (str, ndarray)
        Panel title and a 2D array indexed ``[x, y]`` in RAS order (x: left to right,
        y: posterior to anterior), as :mod:`bidsapp.transforms.mni_slice` prepares slices;
        drawn with anterior up and the participant's left on the left.
    vmin, vmax : float
        Grey range of the image panels.
    diff_vmax : float or None
        Upper end of the colour range of the difference panel (``None``: its 99.5th percentile
        of the positive values).
    diff_index : int or None
        Which panel is a difference, drawn in ``inferno`` with a colour bar (``None``: none).
    title : str or None
        Text above the row.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> a = np.linspace(0, 1, 64).reshape(8, 8)
    >>> fig = plot_slice_row([("input", a), ("reconstruction", a), ("|difference|", 0 * a)],
    ...                      diff_index=2)
    >>> len(fig.axes)
    4
    """
    if not panels:
        raise ValueError("panels must hold at least one (title, array) pair")
    arrays = []
    for name, data in panels:
        data = np.asarray(data, dtype=float)
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[:, :, 0]
        if data.ndim != 2:
            raise ValueError(f"panel {name!r} is not a 2D slice (shape {data.shape})")
        arrays.append((str(name), data))
    head = 0.35 if title else 0.0
    width, height = len(arrays) * _PANEL_IN * 1.25, _PANEL_IN * 1.25 + 0.3 + head
    fig = Figure(figsize=(width, height), facecolor=_BG)
    FigureCanvasAgg(fig)
    panel_w = 1.0 / len(arrays)
    for k, (name, data) in enumerate(arrays):
        ax = fig.add_axes([k * panel_w + 0.01, 0.02, panel_w * (0.74 if k == diff_index else 0.98),
                           (height - 0.3 - head) / height])
        ax.set_facecolor(_BG)
        if k == diff_index:
            positive = data[np.isfinite(data) & (data > 0)]
            top = diff_vmax if diff_vmax is not None else (
                float(np.percentile(positive, 99.5)) if positive.size else 1.0)
            image = ax.imshow(data.T, origin="lower", cmap="inferno", vmin=0.0,
                              vmax=max(top, 1e-6), interpolation="nearest")
            cax = fig.add_axes([k * panel_w + panel_w * 0.77, 0.1, 0.012,
                                0.75 * (height - 0.3 - head) / height])
            bar = fig.colorbar(image, cax=cax, format="%.2g")
            bar.ax.tick_params(colors="white", labelsize=8)
            bar.outline.set_edgecolor("white")
        else:
            ax.imshow(data.T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, color="white", fontsize=11)
        ax.text(0.02, 0.5, "L", color="white", fontsize=9, transform=ax.transAxes, va="center")
        ax.text(0.98, 0.5, "R", color="white", fontsize=9, transform=ax.transAxes, va="center",
                ha="right")
    if title:
        fig.text(0.005, 1.0 - 0.5 * head / height, title, color="white", fontsize=12,
                 va="center", ha="left")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, max_bytes: int = FIGURE_MAX_BYTES,
                png_dpi: int = 100) -> Path:
    """Write a figure as SVG, or as PNG when the SVG would exceed ``max_bytes``.

    The file is written atomically; a stale copy in the other format (from an earlier run)
    is removed so a report never links an out-of-date picture.  The figure is closed.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        Figure to save.
    path : path
        Destination ending in ``.svg`` (the PNG variant replaces the extension).
    max_bytes : int
        Size limit of the SVG.
    png_dpi : int
        Resolution of the PNG fallback.

    Returns
    -------
    pathlib.Path
        The file actually written (``.svg`` or ``.png``).
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = Path(path)
    if path.suffix != ".svg":
        raise ValueError(f"path must end with '.svg', got {path.name}")
    if max_bytes <= 0 or png_dpi <= 0:
        raise ValueError("max_bytes and png_dpi must be positive")
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    face = fig.get_facecolor()
    buffer = io.BytesIO()
    # A fixed hash salt and no date keep the SVG byte-identical across runs (matplotlib
    # otherwise salts element ids with a random UUID), so reruns produce the same files.
    with rc_context({"svg.hashsalt": "brainage"}):
        fig.savefig(buffer, format="svg", facecolor=face, metadata={"Date": None})
    target, other = path, path.with_suffix(".png")
    if buffer.tell() > max_bytes:
        LOGGER.debug("%s: SVG is %d bytes, writing PNG instead", path.name, buffer.tell())
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", facecolor=face, dpi=png_dpi,
                    metadata={"Software": None})
        target, other = other, path
    with atomic_write(target, "wb") as handle:
        handle.write(buffer.getvalue())
    other.unlink(missing_ok=True)
    fig.clear()
    return target
