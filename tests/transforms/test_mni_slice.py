"""Seed-001 input preparation: the medial axial slice of the MNI-space T1w, in [0, 1], 128^2."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bidsapp.errors import ImageError
from bidsapp.templates import get_template
from bidsapp.transforms.mni_slice import (MNISliceSpec, normalise_unit, prepare_slice_views,
                                          slice_planes, slice_z_mm, view_affine)

# planted markers: template voxel (x, y, z) of each; the medial plane of the 130 cube (65) lies
# at template z = 65.5 * 95 / 130 - 0.5 = 47.37, plane 55 at z = 40.06
MEDIAL, LOWER = (30, 70, 47), (65, 40, 40)


def _image_with_markers(value=4000.0):
    """Template T1w x 400 in the brain mask, with 3 x 3 x 1 bright markers at MEDIAL and LOWER."""
    tpl = get_template(2.0)
    mask = np.asarray(tpl.mask.dataobj) > 0
    data = np.where(mask, tpl.t1w.get_fdata(dtype=np.float32) * 400, 0).astype(np.float32)
    for x, y, z in (MEDIAL, LOWER):
        data[x - 1:x + 2, y - 1:y + 2, z] = value
    return nib.Nifti1Image(data, tpl.affine), data


def _pixel(voxel, size=128):
    """Output pixel of a template voxel: pixel i lies at template voxel (i + 0.5) n / size - 0.5."""
    shape = get_template(2.0).shape
    return tuple((v + 0.5) * size / n - 0.5 for v, n in zip(voxel[:2], shape[:2]))


def test_medial_plane_is_a_fixed_mni_z_and_the_affine_maps_pixels_to_it():
    spec = MNISliceSpec()
    assert slice_planes(spec) == [65]
    tpl = get_template(2.0)
    (z,) = slice_z_mm(spec)
    assert z == pytest.approx(tpl.affine[2, 3] + 2.0 * (65.5 * 95 / 130 - 0.5))  # +22.73 mm
    affine = view_affine(spec)
    # the field of view of the template grid (edges at voxel -0.5 and n - 0.5), 128 pixels
    first, last = affine @ [0, 0, 0, 1], affine @ [127, 127, 0, 1]
    np.testing.assert_allclose(first[:3], (tpl.affine @ [0.5 * 99 / 128 - 0.5,
                                                         0.5 * 117 / 128 - 0.5, 0, 1])[:3]
                               + [0, 0, z - tpl.affine[2, 3]])
    assert last[0] - first[0] == pytest.approx(127 * 2.0 * 99 / 128)
    assert last[2] == pytest.approx(z)
    # invertible: the third axis is one plane of the 130-plane cube over the template's 95 planes
    assert affine[2, 2] == pytest.approx(2.0 * 95 / 130) and abs(np.linalg.det(affine)) > 0


def test_marker_in_the_medial_plane_is_found_at_its_position():
    img, _ = _image_with_markers()
    (view,) = prepare_slice_views(img, MNISliceSpec())
    assert view.shape == (128, 128) and view.dtype == np.float32
    assert float(view.min()) == 0.0 and float(view.max()) == 1.0
    peak = np.unravel_index(np.argmax(view), view.shape)
    np.testing.assert_allclose(peak, _pixel(MEDIAL), atol=1.0)
    # its world position is the marker's (within a pixel) at the plane's MNI z
    world = view_affine(MNISliceSpec()) @ [*peak, 0, 1]
    marker = get_template(2.0).affine @ [*MEDIAL, 1]
    np.testing.assert_allclose(world[:2], marker[:2], atol=2.0)
    # the marker 14 mm lower is not in this slice: brain-level values only
    lower = np.round(_pixel(LOWER)).astype(int)
    assert float(view[lower[0] - 1:lower[0] + 2, lower[1] - 1:lower[1] + 2].max()) < 0.3


def test_neighbouring_views_follow_the_plane_order():
    img, _ = _image_with_markers()
    spec = MNISliceSpec(neighbour_slices=1, neighbour_step=10)
    assert slice_planes(spec) == [65, 55, 75]
    views = prepare_slice_views(img, spec)
    assert len(views) == 3 and all(v.shape == (128, 128) for v in views)
    assert all(0.0 <= float(v.min()) and float(v.max()) <= 1.0 for v in views)
    np.testing.assert_array_equal(views[0], prepare_slice_views(img, MNISliceSpec())[0])
    # view 1 is plane 55: it holds the lower marker, not the medial one
    peak = np.unravel_index(np.argmax(views[1]), views[1].shape)
    np.testing.assert_allclose(peak, _pixel(LOWER), atol=1.0)
    medial = np.round(_pixel(MEDIAL)).astype(int)
    assert float(views[1][medial[0] - 1:medial[0] + 2, medial[1] - 1:medial[1] + 2].max()) < 0.3
    # the same plane as a slice offset
    same = prepare_slice_views(img, MNISliceSpec(slice_offset=-10))[0]
    np.testing.assert_array_equal(same, views[1])


def test_reduced_size_and_percentile_scaling(tmp_path):
    img, data = _image_with_markers()
    path = tmp_path / "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"
    img.to_filename(path)
    (small,) = prepare_slice_views(path, MNISliceSpec(size=64))
    assert small.shape == (64, 64) and float(small.max()) == 1.0
    peak = np.unravel_index(np.argmax(small), small.shape)
    np.testing.assert_allclose(peak, _pixel(MEDIAL, 64), atol=1.0)
    # with the 99th percentile as 1 the marker saturates and the brain gets brighter
    (robust,) = prepare_slice_views(path, MNISliceSpec(upper_percentile=99.0))
    (plain,) = prepare_slice_views(path, MNISliceSpec())
    assert 0.0 <= float(robust.min()) and float(robust.max()) == 1.0
    assert np.mean(robust == 1.0) > np.mean(plain == 1.0)
    assert float(np.median(robust[robust > 0])) > 2 * float(np.median(plain[plain > 0]))


def test_normalise_unit_known_answers():
    np.testing.assert_allclose(normalise_unit(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(normalise_unit(np.full((2, 2), 7.0)), np.zeros((2, 2)))
    out = normalise_unit(np.arange(101.0), upper_percentile=90.0)
    assert out[90] == pytest.approx(1.0) and out[100] == 1.0 and out[45] == pytest.approx(0.5)


def test_empty_image_is_refused():
    tpl = get_template(2.0)
    with pytest.raises(ImageError, match="no positive brain voxel"):
        prepare_slice_views(nib.Nifti1Image(np.zeros(tpl.shape, np.float32), tpl.affine),
                            MNISliceSpec())


@pytest.mark.parametrize("values, message", [
    ({"grid_size": 4}, "grid_size"), ({"size": 130.0}, "size"),
    ({"neighbour_slices": -1}, "neighbour_slices"), ({"neighbour_step": 0}, "neighbour_step"),
    ({"slice_offset": 70}, "outside the cube"),
    ({"neighbour_slices": 7, "neighbour_step": 10}, "outside the cube"),
    ({"upper_percentile": 40.0}, "upper_percentile"), ({"sise": 3}, "unknown input parameter"),
])
def test_spec_checks(values, message):
    with pytest.raises(ValueError, match=message):
        MNISliceSpec.from_dict(values)


def test_spec_round_trip():
    spec = MNISliceSpec(size=64, neighbour_slices=2, neighbour_step=2, upper_percentile=99)
    assert MNISliceSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["upper_percentile"] == 99.0
    with pytest.raises(ValueError, match="view"):
        view_affine(spec, 5)
