"""Jacobian modulation: known scalings and a known nonlinear warp preserve tissue volume."""

from __future__ import annotations

import numpy as np
import pytest

from bidsapp.anat._runtime import import_ants, to_ants
from bidsapp.anat.grid import new_image
from bidsapp.anat.modulate import (composed_displacement, jacobian_determinant, jacobian_from_displacement,
                                   modulate, smooth_fwhm)
from bidsapp.anat.qc import map_volume_ml


def _grid(shape, spacing, origin):
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return new_image(np.zeros(shape, np.float32), affine)


def _ball(shape, spacing, origin, centre_mm, radius_mm):
    """Soft-edged ball probability map (1 inside, linear 2 mm ramp at the edge)."""
    ref = _grid(shape, spacing, origin)
    ijk = np.indices(shape).reshape(3, -1)
    world = ref.affine[:3, :3] @ ijk + ref.affine[:3, 3:4]
    dist = np.linalg.norm(world - np.asarray(centre_mm, float)[:, None], axis=0).reshape(shape)
    return new_image(np.clip((radius_mm + 1.0 - dist) / 2.0, 0.0, 1.0), ref.affine)


@pytest.fixture(scope="module")
def ants():
    return import_ants(1)


@pytest.fixture(scope="module")
def scaling_xfm(tmp_path_factory, ants):
    """Affine transform mapping template points y to native points S y + t, det S = 1.188."""
    path = tmp_path_factory.mktemp("xfm") / "scale.mat"
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.diag([1.1, 0.9, 1.2]), center=(0.0, 0.0, 0.0),
                                    translation=(3.0, -2.0, 5.0))
    ants.write_transform(tx, str(path))
    return path


def test_jacobian_of_a_known_scaling(scaling_xfm):
    ref = _grid((40, 46, 38), 2.0, (-40.0, -46.0, -38.0))
    jac = jacobian_determinant(scaling_xfm, ref).get_fdata()
    np.testing.assert_allclose(jac, 1.1 * 0.9 * 1.2, rtol=1e-4)


def test_modulation_preserves_volume_under_scaling(scaling_xfm):
    native = _ball((120, 120, 120), 1.0, (-60.0, -60.0, -60.0), (5.0, -3.0, 4.0), 30.0)
    ref = _grid((50, 56, 48), 2.0, (-50.0, -56.0, -48.0))
    modulated = modulate(native, scaling_xfm, ref)
    assert map_volume_ml(modulated) == pytest.approx(map_volume_ml(native), rel=0.005)
    # without the Jacobian the template-space total is off by the scaling (the test is sensitive)
    jac = new_image(np.ones(ref.shape, np.float32), ref.affine)
    plain = modulate(native, scaling_xfm, ref, jacobian=jac)
    assert map_volume_ml(plain) == pytest.approx(map_volume_ml(native) / 1.188, rel=0.01)


@pytest.fixture(scope="module")
def bump_warp(tmp_path_factory, ants):
    """Displacement-field transform u = (a g(p), 0, 0), g a Gaussian bump (LPS mm), and its analytic J."""
    ref = _grid((50, 50, 50), 2.0, (-50.0, -50.0, -50.0))
    ref_ants = to_ants(ref, ants)
    ijk = np.indices(ref.shape).reshape(3, -1).astype(float)
    lps = np.asarray(ref_ants.direction) @ (ijk * 2.0) + np.asarray(ref_ants.origin)[:, None]
    centre, amp, width = np.array([5.0, 0.0, 0.0]), 8.0, 12.0
    g = np.exp(-((lps - centre[:, None]) ** 2).sum(0) / (2 * width**2))
    field = np.zeros(ref.shape + (3,), np.float32)
    field[..., 0] = (amp * g).reshape(ref.shape)
    analytic = (1.0 - amp * (lps[0] - centre[0]) / width**2 * g).reshape(ref.shape)
    warp = ants.from_numpy(field, origin=ref_ants.origin, spacing=ref_ants.spacing,
                           direction=ref_ants.direction, has_components=True)
    path = tmp_path_factory.mktemp("warp") / "warp.nii.gz"
    ants.image_write(warp, str(path))
    return path, ref, analytic


def test_jacobian_of_a_known_displacement_field(bump_warp):
    path, ref, analytic = bump_warp
    jac = jacobian_determinant(path, ref).get_fdata()
    inner = (slice(2, -2),) * 3  # central differences are one-sided at the border
    np.testing.assert_allclose(jac[inner], analytic[inner], atol=0.01)
    assert analytic.min() < 0.75 and analytic.max() > 1.25  # a real local expansion and compression


def test_modulation_preserves_volume_under_a_nonlinear_warp(bump_warp):
    path, ref, _ = bump_warp
    # a ball on the bump's expanding flank (LPS x = -7 is RAS x = +7): its template-space extent
    # differs from its native one, so only the Jacobian can restore the volume
    native = _ball((90, 90, 90), 1.0, (-45.0, -45.0, -45.0), (7.0, 2.0, 0.0), 10.0)
    modulated = modulate(native, path, ref)
    assert map_volume_ml(modulated) == pytest.approx(map_volume_ml(native), rel=0.01)
    plain = modulate(native, path, ref, jacobian=new_image(np.ones(ref.shape, np.float32), ref.affine))
    assert abs(map_volume_ml(plain) / map_volume_ml(native) - 1.0) > 0.1


def test_field_interpolated_to_a_finer_grid_gives_the_same_determinant(scaling_xfm):
    coarse = _grid((30, 30, 30), 2.0, (-30.0, -30.0, -30.0))
    fine = _grid((39, 39, 39), 1.5, (-30.0, -30.0, -30.0))
    field = composed_displacement(scaling_xfm, coarse)
    assert field.shape == (30, 30, 30, 3)
    jac = jacobian_from_displacement(field, fine).get_fdata()
    np.testing.assert_allclose(jac[1:-1, 1:-1, 1:-1], 1.188, rtol=1e-4)


def test_smoothing_has_the_requested_fwhm_and_keeps_the_sum():
    data = np.zeros((41, 41, 41), np.float32)
    data[20, 20, 20] = 1.0
    out = smooth_fwhm(new_image(data, np.diag([1.0, 1.0, 1.0, 1.0])), 4.0).get_fdata()
    assert out.sum() == pytest.approx(1.0, rel=1e-4)
    profile = out[:, 20, 20] / out[20, 20, 20]
    # half maximum 2 mm either side of the peak (linear interpolation between voxels)
    above = np.flatnonzero(profile >= 0.5)
    left = above[0] - (profile[above[0]] - 0.5) / (profile[above[0]] - profile[above[0] - 1])
    assert 2 * (20 - left) == pytest.approx(4.0, abs=0.1)
    with pytest.raises(ValueError, match="fwhm_mm"):
        smooth_fwhm(new_image(data, np.eye(4)), 0)
