"""Resampling helpers against analytic answers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bidsapp.anat.grid import (crop, grid_spacing, mask_bounding_box, new_image, resample_to_grid,
                               voxel_volume_ml, working_grid)


def _ramp(shape, affine):
    """Image whose value is a linear function of world position: trilinear sampling is exact."""
    ijk = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    values = 2.0 * world[0] - 0.5 * world[1] + 1.5 * world[2] + 10.0
    return new_image(values.reshape(shape), affine)


def test_linear_function_is_resampled_exactly_onto_a_rotated_grid():
    src = _ramp((40, 44, 36), np.diag([2.0, 2.0, 2.0, 1.0]))
    angle = np.deg2rad(20)
    dst_affine = np.eye(4)
    dst_affine[:3, :3] = 1.5 * np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                                         [0, 0, 1]])
    dst_affine[:3, 3] = [30.0, 10.0, 15.0]
    out = resample_to_grid(src, (20, 20, 20), dst_affine, order=1, antialias=False)
    expected = _ramp((20, 20, 20), dst_affine).get_fdata()
    np.testing.assert_allclose(out.get_fdata(), expected, rtol=1e-5, atol=1e-3)


def test_outside_values_constant_or_nearest():
    src = new_image(np.ones((10, 10, 10)), np.eye(4))
    far = np.eye(4)
    far[:3, 3] = 100.0
    assert resample_to_grid(src, (3, 3, 3), far, antialias=False).get_fdata().max() == 0.0
    assert resample_to_grid(src, (3, 3, 3), far, antialias=False, mode="nearest").get_fdata().min() == 1.0


def test_antialiased_downsampling_preserves_the_integral():
    shape = (120, 120, 120)
    grid = np.indices(shape).astype(float)
    radius = np.sqrt(((grid - 60.0) ** 2).sum(0))
    blob = np.clip(40.0 - radius, 0, 1)  # a 1 mm ball with a one-voxel soft edge
    src = new_image(blob, np.eye(4))
    for res in (1.5, 2.0):
        dst_shape = tuple(int(np.floor(119 / res)) + 1 for _ in range(3))
        dst = resample_to_grid(src, dst_shape, np.diag([res, res, res, 1.0]))
        ratio = dst.get_fdata().sum() * res**3 / blob.sum()
        assert ratio == pytest.approx(1.0, abs=0.002)


def test_working_grid_keeps_field_of_view_and_directions():
    affine = np.array([[0, 0, 1.0, -90], [-1.0, 0, 0, 110], [0, 1.0, 0, -70], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros((181, 217, 181), np.float32), affine)
    shape, work = working_grid(img, 2.0)
    assert shape == (91, 109, 91)
    np.testing.assert_allclose(grid_spacing(work), [2.0, 2.0, 2.0])
    # same axis directions, and the first work voxel's outer corner is the native one's
    np.testing.assert_allclose(work[:3, :3] / 2.0, affine[:3, :3])
    np.testing.assert_allclose(work @ [-0.5, -0.5, -0.5, 1], affine @ [-0.5, -0.5, -0.5, 1])
    # coarse axes are kept, never upsampled
    thick = nib.Nifti1Image(np.zeros((256, 256, 30), np.float32), np.diag([0.9, 0.9, 5.0, 1.0]))
    shape, work = working_grid(thick, 2.0)
    np.testing.assert_allclose(grid_spacing(work), [2.0, 2.0, 5.0])
    assert shape == (116, 116, 30)


def test_bounding_box_and_crop_keep_world_positions():
    data = np.zeros((30, 30, 30), np.float32)
    data[10:15, 12:20, 5:8] = np.arange(5 * 8 * 3).reshape(5, 8, 3) + 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-30, -20, -10]
    box = mask_bounding_box(data > 0, affine, margin_mm=4.0)
    assert box == (slice(8, 17), slice(10, 22), slice(3, 10))
    cropped = crop(new_image(data, affine), box)
    assert cropped.get_fdata().sum() == data.sum()
    np.testing.assert_allclose(cropped.affine @ [0, 0, 0, 1], affine @ [8, 10, 3, 1])
    with pytest.raises(ValueError, match="mask is empty"):
        mask_bounding_box(np.zeros((3, 3, 3)), affine)


def test_voxel_volume_and_argument_checks():
    assert voxel_volume_ml(new_image(np.zeros((2, 2, 2)), np.diag([2.0, 2.0, 2.0, 1.0]))) == pytest.approx(0.008)
    img = new_image(np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="order"):
        resample_to_grid(img, (2, 2, 2), np.eye(4), order=5)
    with pytest.raises(ValueError, match="mode"):
        resample_to_grid(img, (2, 2, 2), np.eye(4), mode="wrap")
    with pytest.raises(ValueError, match="resolution_mm"):
        working_grid(img, 0)
