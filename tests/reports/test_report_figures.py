"""Figure helpers: cut placement, intensity range, cropping, drawing and saving."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from matplotlib.figure import Figure

from bidsapp.errors import ImageError
from bidsapp.reports.figures import (Contour, Overlay, crop_to_mask, cuts_from_mask, load_3d,
                                     plot_mosaic, plot_overlay, plot_slice_row, robust_range,
                                     save_figure)


def _cube_mask(shape=(20, 20, 20), lo=5, hi=10, affine=None) -> nib.Nifti1Image:
    data = np.zeros(shape, np.uint8)
    data[lo:hi, lo:hi, lo:hi] = 1
    return nib.Nifti1Image(data, np.eye(4) if affine is None else affine)


def test_cuts_span_mask_box_in_world_mm():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -20, -30]
    # voxels 5..9 -> x 0..8, y -10..-2, z -20..-12
    cuts = cuts_from_mask(_cube_mask(affine=affine), 3, margin=0.0)
    assert cuts == {"x": [0.0, 4.0, 8.0], "y": [-10.0, -6.0, -2.0], "z": [-20.0, -16.0, -12.0]}
    inner = cuts_from_mask(_cube_mask(affine=affine), 3, axes="z", margin=0.25)
    assert inner == {"z": [-18.0, -16.0, -14.0]}


def test_cuts_follow_a_permuted_affine():
    # Voxel axis i runs along world z, j along x and k along y (as in IXI's 'PSR'-like files).
    affine = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 100.0], [0, 0, 0, 1]])
    data = np.zeros((30, 10, 10), np.uint8)
    data[20:25, 2:4, 6:8] = 1
    cuts = cuts_from_mask(nib.Nifti1Image(data, affine), 2, margin=0.0)
    assert cuts == {"x": [2.0, 3.0], "y": [6.0, 7.0], "z": [120.0, 124.0]}


def test_cuts_reject_bad_arguments():
    with pytest.raises(ValueError, match="no voxel"):
        cuts_from_mask(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)))
    with pytest.raises(ValueError, match="n_cuts"):
        cuts_from_mask(_cube_mask(), 0)
    with pytest.raises(ValueError, match="axes"):
        cuts_from_mask(_cube_mask(), axes="w")


def test_load_3d_squeezes_singleton_and_rejects_4d(tmp_path):
    img = nib.Nifti1Image(np.ones((3, 4, 5, 1), np.float32), np.eye(4))
    assert load_3d(img).shape == (3, 4, 5)
    with pytest.raises(ImageError, match="3D"):
        load_3d(nib.Nifti1Image(np.ones((3, 4, 5, 2), np.float32), np.eye(4)))
    with pytest.raises(ImageError, match="cannot read"):
        load_3d(tmp_path / "missing.nii.gz")
    with pytest.raises(TypeError, match="img"):
        load_3d(np.ones((3, 3, 3)))


def test_robust_range_uses_nonzero_voxels_inside_mask():
    data = np.zeros((10, 10, 10), np.float32)
    data[:5] = np.arange(500, dtype=np.float32).reshape(5, 10, 10) + 1
    data[5:] = 10_000.0  # bright voxels outside the mask
    img = nib.Nifti1Image(data, np.eye(4))
    mask = nib.Nifti1Image((np.indices(data.shape)[0] < 5).astype(np.uint8), np.eye(4))
    assert robust_range(img, mask, (10, 90)) == pytest.approx(
        tuple(np.percentile(np.arange(1, 501), [10, 90])))
    assert robust_range(img)[1] == pytest.approx(10_000.0)
    with pytest.raises(ValueError, match="percentiles"):
        robust_range(img, percentiles=(50, 10))


def test_crop_keeps_the_mask_box_plus_margin():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.random.default_rng(0).random((30, 30, 30)).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    mask = _cube_mask((30, 30, 30), 10, 15, affine)  # world 20..28 mm on each axis
    cropped = crop_to_mask(img, mask, margin_mm=4.0)  # keeps 16..32 mm -> voxels 8..16
    assert cropped.shape == (9, 9, 9)
    assert np.allclose(cropped.affine[:3, 3], [16.0, 16.0, 16.0])
    assert np.array_equal(np.asanyarray(cropped.dataobj), data[8:17, 8:17, 8:17])


def _red_pixels(fig: Figure) -> int:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60, facecolor="black")
    buffer.seek(0)
    rgb = matplotlib.image.imread(buffer)[..., :3]
    return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.25) & (rgb[..., 2] < 0.25)).sum())


def test_mosaic_draws_contours_only_when_asked():
    bg = nib.Nifti1Image(np.random.default_rng(1).random((20, 20, 20)).astype(np.float32) + 1,
                         np.eye(4))
    mask = _cube_mask()
    cuts = cuts_from_mask(mask, 3)
    plain = plot_mosaic(bg, cuts=cuts)
    outlined = plot_mosaic(bg, cuts=cuts, contours=[Contour(mask, "#ff0000", "mask", linewidth=2)])
    assert _red_pixels(plain) == 0
    assert _red_pixels(outlined) > 100
    # one row of axes per axis of the cuts, labelled legend under the panels
    assert outlined.legends and outlined.legends[0].texts[0].get_text() == "mask"


def test_overlay_colour_range_is_symmetric_for_signed_maps():
    bg = nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4))
    data = np.zeros((20, 20, 20), np.float32)
    data[5:10, 5:10, 5:10] = 2.0
    data[10:15, 10:15, 10:15] = -1.0
    cuts = cuts_from_mask(_cube_mask(lo=5, hi=15), 2)
    fig = plot_overlay(bg, nib.Nifti1Image(data, np.eye(4)), cuts=cuts, label="relevance")
    cbar = fig.axes[-1]
    low, high = cbar.get_ylim()
    assert low == pytest.approx(-high) and high == pytest.approx(2.0)
    assert cbar.get_ylabel() == "relevance"
    positive = plot_mosaic(bg, cuts=cuts, overlay=Overlay(nib.Nifti1Image(np.abs(data), np.eye(4)),
                                                          vmin=0.0, vmax=3.0))
    assert positive.axes[-1].get_ylim() == pytest.approx((0.0, 3.0))


def test_symmetric_overlay_clips_at_the_requested_percentile_of_magnitudes():
    # one-signed relevance with a few extreme voxels: symmetric range, +-99th percentile of |r|
    bg = nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4))
    data = np.zeros((20, 20, 20), np.float32)
    data[5:15, 5:15, 5:15] = np.linspace(0.01, 1.0, 1000).reshape(10, 10, 10)
    data[5, 5, 5:8] = 50.0  # 3 of 1000 non-zero voxels: above the 99th percentile
    values = data[data != 0]
    cuts = cuts_from_mask(_cube_mask(lo=5, hi=15), 2)
    fig = plot_mosaic(bg, cuts=cuts, overlay=Overlay(nib.Nifti1Image(data, np.eye(4)),
                                                     symmetric=True, percentile=99.0))
    low, high = fig.axes[-1].get_ylim()
    assert high == pytest.approx(np.percentile(np.abs(values), 99.0), rel=1e-5)
    assert low == pytest.approx(-high) and high < 50.0


def test_mosaic_rejects_bad_arguments():
    bg = nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="cuts"):
        plot_mosaic(bg, cuts={})
    with pytest.raises(ValueError, match="'x', 'y' or 'z'"):
        plot_mosaic(bg, cuts={"q": [1.0]})
    with pytest.raises(TypeError, match="Contour"):
        plot_mosaic(bg, cuts={"z": [1.0]}, contours=[bg])


def _small_figure() -> Figure:
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_save_figure_svg_reproducible_and_png_fallback(tmp_path):
    target = tmp_path / "figs" / "sub-01_desc-test_T1w.svg"
    first = save_figure(_small_figure(), target)
    assert first == target
    content = target.read_bytes()
    assert ET.fromstring(content).tag.endswith("svg")
    assert save_figure(_small_figure(), target).read_bytes() == content  # byte-identical rerun
    # Over the size limit: PNG instead, and the stale SVG of the earlier run is gone.
    png = save_figure(_small_figure(), target, max_bytes=100)
    assert png == target.with_suffix(".png") and not target.exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in target.parent.iterdir() if ".part" in p.name]
    with pytest.raises(ValueError, match=".svg"):
        save_figure(_small_figure(), tmp_path / "x.png")


def test_oblique_images_are_drawn_in_world_space():
    # A cube mask on a grid rotated by 20 degrees about z: the display grid is world-aligned
    # and keeps intensities at the same world positions.
    from bidsapp.reports.figures import _display_grid

    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine[:3, :3] *= 2.0
    data = np.zeros((30, 30, 30), np.float32)
    data[10:20, 10:20, 10:20] = 1.0
    oblique = nib.Nifti1Image(data, affine)
    aligned = _display_grid(oblique)
    assert np.count_nonzero(aligned.affine[:3, :3] - np.diag(np.diag(aligned.affine[:3, :3]))) == 0
    centre = nib.affines.apply_affine(affine, [15, 15, 15])
    ijk = np.round(nib.affines.apply_affine(np.linalg.inv(aligned.affine), centre)).astype(int)
    assert aligned.get_fdata()[tuple(ijk)] == pytest.approx(1.0)
    mask = nib.Nifti1Image(data.astype(np.uint8), affine)
    fig = plot_mosaic(oblique, cuts=cuts_from_mask(mask, 3), contours=[Contour(mask, "#ff0000")])
    assert _red_pixels(fig) > 50


def test_slice_row_draws_anterior_up_and_rejects_volumes():
    plane = np.zeros((10, 14))
    plane[:, -3:] = 1.0  # anterior rows (largest y) bright
    fig = plot_slice_row([("a", plane), ("b", plane[:, :, None]), ("d", 0.5 * plane)],
                         diff_index=2, title="row")
    axes = fig.axes
    assert len(axes) == 4 and [ax.get_title() for ax in axes[:3]] == ["a", "b", "d"]
    image = axes[0].get_images()[0]
    shown = np.asarray(image.get_array())
    assert shown.shape == (14, 10) and image.origin == "lower"
    assert shown[-1].max() == 1.0 and shown[0].max() == 0.0  # y up: anterior at the top
    assert axes[2].get_images()[0].get_cmap().name == "inferno"
    with pytest.raises(ValueError, match="not a 2D slice"):
        plot_slice_row([("volume", np.zeros((4, 4, 4)))])
    with pytest.raises(ValueError, match="at least one"):
        plot_slice_row([])
