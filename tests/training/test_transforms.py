"""Input preparation of seed 004: slicing, resampling, normalisation, crop/pad, augmentation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bidsapp.errors import ImageError
from bidsapp.transforms import (ClinicalInputSpec, Compose, CropOrPad, Flip, Gamma,
                                PercentileZNormalise, RandomFlip, RandomGamma,
                                RandomIntensityScale, RandomShift, ResampleToSpacing, Shift,
                                SimulateThickSlices, ThickSliceSimulation, Volume, axial_axis,
                                clinical_augmentation, load_skull_stripped, parse_range,
                                prepare_views, slicing_offsets, slicing_step)


def _world(volume: Volume, index) -> np.ndarray:
    return (volume.affine @ np.append(np.asarray(index, float), 1))[:3]


def _ramp_volume(shape=(20, 24, 30), zooms=(2.0, 2.0, 2.0), coeffs=(0.5, -0.25, 1.5)):
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-10.0, 5.0, -30.0)
    ijk = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4])
    data = (np.asarray(coeffs) @ world).reshape(shape) + 100
    return Volume(data.astype(np.float32), affine), (lambda xyz: np.asarray(coeffs) @ xyz + 100)


@pytest.mark.parametrize("spacing, gap, expected", [(2.0, 7.0, 4), (1.0, 7.0, 7), (0.8, 7.0, 9),
                                                    (1.75, 7.0, 4), (3.5, 7.0, 2), (8.0, 7.0, 1)])
def test_slicing_step_is_smallest_multiple_reaching_gap(spacing, gap, expected):
    assert slicing_step(spacing, gap) == expected
    assert expected * spacing >= gap - 1e-9 and (expected - 1) * spacing < gap - 1e-9


def test_thick_slicing_keeps_every_kth_slice_with_exact_affine():
    volume, _ = _ramp_volume()
    for offset in range(4):
        out = ThickSliceSimulation(7.0, offset)(volume)
        kept = np.arange(offset, volume.shape[2], 4)
        np.testing.assert_array_equal(out.data, volume.data[:, :, kept])
        np.testing.assert_allclose(out.zooms, [2, 2, 8])
        for j, z in enumerate(kept):
            np.testing.assert_allclose(_world(out, (3, 5, j)), _world(volume, (3, 5, z)))
    with pytest.raises(ValueError, match="offset"):
        ThickSliceSimulation(7.0, 4)(volume)


def test_resampling_reproduces_a_linear_image_in_world_coordinates():
    volume, ramp = _ramp_volume()
    out = ResampleToSpacing(3.0, antialias=False)(volume)
    assert out.shape == (13, 16, 20)
    np.testing.assert_allclose(out.zooms, 3.0)
    # linear interpolation is exact for a linear image away from the clamped border
    for index in [(2, 3, 4), (6, 8, 10), (10, 12, 15)]:
        assert out.data[index] == pytest.approx(ramp(_world(out, index)), abs=1e-3)
    # field of view centre preserved
    np.testing.assert_allclose(_world(out, (np.array(out.shape) - 1) / 2),
                               _world(volume, (np.array(volume.shape) - 1) / 2))


def test_slicing_then_interpolation_recovers_a_linear_axial_profile():
    volume, ramp = _ramp_volume(coeffs=(0.0, 0.0, 1.0))
    sliced = ThickSliceSimulation(7.0, 1)(volume)
    out = ResampleToSpacing(2.0)(sliced)
    # interior voxels between kept slices are interpolated exactly on a linear profile
    for index in [(5, 5, 8), (5, 5, 13), (5, 5, 20)]:
        assert out.data[index] == pytest.approx(ramp(_world(out, index)), abs=1e-3)


def test_simulated_thick_slices_average_the_slab():
    volume, ramp = _ramp_volume(coeffs=(0.0, 0.0, 1.0))
    out = SimulateThickSlices(5.0)(volume)
    assert out.shape[2] == 12 and out.zooms[2] == pytest.approx(5.0)
    for j in range(2, 10):  # box average of a linear profile = its value at the centre
        assert out.data[4, 4, j] == pytest.approx(ramp(_world(out, (4, 4, j))), abs=1e-3)
    const = SimulateThickSlices(7.0, thickness_mm=5.0)(volume.with_data(np.full(volume.shape, 3.0, np.float32)))
    np.testing.assert_allclose(const.data, 3.0, rtol=1e-6)


def test_axial_axis_follows_the_affine():
    assert axial_axis(np.diag([2, 2, 2, 1])) == 2
    psr = np.array([[0, 0, 2, 0], [-2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1.0]])
    assert axial_axis(psr) == 1


def test_percentile_normalisation_known_answer(rng):
    data = np.zeros((20, 20, 20), np.float32)
    data[5:15, 5:15, 5:15] = rng.gamma(4.0, 50.0, (10, 10, 10))
    volume = Volume(data, np.eye(4))
    out = PercentileZNormalise()(volume).data
    fg = data[data != 0]
    lo, hi = np.percentile(fg, [1, 99])
    inner = fg[(fg >= lo) & (fg <= hi)]
    expected = data / inner.std()  # z-score then background shifted to 0 == x / sd
    ceiling = np.percentile(expected[data != 0], 99.9)
    np.testing.assert_allclose(out, np.minimum(expected, ceiling), rtol=1e-5, atol=1e-5)
    assert np.all(out[data == 0] == 0)
    assert out.max() == pytest.approx(ceiling, rel=1e-5)


def test_crop_or_pad_centres_the_brain_and_keeps_world_positions():
    data = np.zeros((40, 50, 30), np.float32)
    data[20:30, 10:20, 5:15] = 1.0  # off-centre "brain"
    data[25, 15, 10] = 7.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    out = CropOrPad((16, 16, 16))(Volume(data, affine))
    assert out.shape == (16, 16, 16)
    assert out.data.sum() == pytest.approx(data.sum())
    marked = np.argwhere(out.data == 7.0)[0]
    np.testing.assert_allclose(_world(out, marked), _world(Volume(data, affine), (25, 15, 10)))
    big = CropOrPad((60, 60, 40))(Volume(data, affine))  # padding
    assert big.data.sum() == pytest.approx(data.sum())


def test_shift_flip_gamma_known_answers():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    volume = Volume(data, np.eye(4))
    shifted = Shift((1, 0, -2))(volume).data
    np.testing.assert_array_equal(shifted[1:, :, :4], data[:-1, :, 2:])
    assert np.all(shifted[0] == 0) and np.all(shifted[:, :, 4:] == 0)
    np.testing.assert_array_equal(Flip((0,))(volume).data, data[::-1])
    signed = Volume(np.array([-4.0, 0.0, 9.0], np.float32).reshape(3, 1, 1), np.eye(4))
    np.testing.assert_allclose(Gamma(0.5)(signed).data.ravel(), [-2.0, 0.0, 3.0])


def test_random_transforms_are_reproducible_and_recorded(rng):
    volume = Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4))
    aug = Compose([RandomShift((2, 2, 1)), RandomFlip((0,), 0.5), RandomGamma((0.7, 1.3)),
                   RandomIntensityScale((0.7, 1.3))])
    a = aug(volume, np.random.default_rng(3))
    b = aug(volume, np.random.default_rng(3))
    np.testing.assert_array_equal(a.data, b.data)
    names = [name for name, _ in a.history]
    assert names == ["Shift", "Flip", "Gamma", "IntensityScale"]
    gamma = a.history[2][1]["gamma"]
    factor = a.history[3][1]["factor"]
    assert 0.7 <= gamma <= 1.3 and 0.7 <= factor <= 1.3
    with pytest.raises(ValueError, match="rng"):
        aug(volume)


def test_parse_range_validates():
    assert parse_range(0.3, "gamma", around=1.0) == (0.7, 1.3)
    with pytest.raises(ValueError, match="gamma"):
        parse_range((1.3, 0.7), "gamma")
    with pytest.raises(TypeError, match="gamma"):
        parse_range(True, "gamma")
    with pytest.raises(ValueError, match="scale_range"):
        RandomIntensityScale((-1.0, 1.0))


def test_clinical_augmentation_converts_mm_to_voxels():
    aug = clinical_augmentation(ClinicalInputSpec(spacing_mm=3.0, shape=(54, 80, 27)))
    assert aug.transforms[0].max_shift == (7, 7, 1)


def test_spec_round_trip_and_validation():
    spec = ClinicalInputSpec(spacing_mm=3.0, shape=(54, 80, 27))
    assert ClinicalInputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown input parameter"):
        ClinicalInputSpec.from_dict({"spacing": 2})
    with pytest.raises(ValueError, match="shape"):
        ClinicalInputSpec(shape=(80, 120))


def test_prepare_views_3d_versus_thick_slice(synth_dataset):
    _, derivs = synth_dataset
    anat = derivs / "sub-s004" / "anat"
    volume = load_skull_stripped(anat / "sub-s004_desc-preproc_T1w.nii.gz",
                                 anat / "sub-s004_desc-brain_mask.nii.gz")
    spec = ClinicalInputSpec(spacing_mm=4.0, shape=(14, 16, 10))
    assert slicing_offsets(volume, spec) == [0, 1, 2, 3]
    views = prepare_views(volume, spec)
    assert len(views) == 4 and all(v.shape == (14, 16, 10) for v in views)
    assert all(v.data.min() >= 0 and v.data.max() > 0 for v in views)
    thick = SimulateThickSlices(6.0)(volume)
    assert slicing_offsets(thick, spec) == [None]
    (view,) = prepare_views(thick, spec)
    assert "ThickSliceSimulation" not in [name for name, _ in view.history]
    # optional thick-slab views of a 3D scan: the same inputs a real 6 mm scan would give
    slab_spec = ClinicalInputSpec(spacing_mm=4.0, shape=(14, 16, 10), thick_view_spacings_mm=(6.0,))
    with_slabs = prepare_views(volume, slab_spec)
    assert len(with_slabs) == 5
    np.testing.assert_array_equal(with_slabs[4].data, view.data)
    np.testing.assert_allclose(with_slabs[4].affine, view.affine)
    assert len(prepare_views(thick, slab_spec)) == 1
    with pytest.raises(ValueError, match="thick_view_spacings_mm"):
        ClinicalInputSpec(thick_view_spacings_mm=(3.0,))


def test_load_skull_stripped_refuses_mismatched_grids(tmp_path):
    nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_filename(tmp_path / "t1.nii.gz")
    nib.Nifti1Image(np.ones((8, 8, 9), np.uint8), np.eye(4)).to_filename(tmp_path / "m.nii.gz")
    with pytest.raises(ImageError, match="same grid"):
        load_skull_stripped(tmp_path / "t1.nii.gz", tmp_path / "m.nii.gz")
