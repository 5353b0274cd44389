"""TFCE against nilearn's transform and against the definition, label by label."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from bidsapp import stats

STRUCT = {6: 1, 18: 2, 26: 3}


def _smooth_map(rng, shape=(20, 20, 20)):
    x = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    x /= x.std()
    x[6:11, 6:11, 6:11] += 2.0
    return x


def _definition(t, mask, thresholds, connectivity, E=0.5, H=2.0):
    """TFCE from its definition: label {t >= h} at every step (what fslmaths does)."""
    out = np.zeros(t.shape)
    struct = ndimage.generate_binary_structure(3, STRUCT[connectivity])
    for h in thresholds:
        lab, _ = ndimage.label((t >= h) & mask, struct)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out += np.where(lab > 0, sizes[lab] ** E * h**H, 0.0)
    return out


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("two_sided", [False, True])
def test_equals_nilearn_transform(rng, connectivity, two_sided):
    from nilearn.mass_univariate._utils import calculate_tfce

    t = _smooth_map(rng)
    ours = stats.tfce_transform(t, connectivity=connectivity, two_sided=two_sided)
    struct = ndimage.generate_binary_structure(3, STRUCT[connectivity])
    ref = calculate_tfce(t[..., None], struct, two_sided_test=two_sided)[..., 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
    assert np.abs(ref).max() > 100          # a non-trivial map was compared


def test_fixed_step_equals_nilearn_when_steps_coincide(rng):
    from nilearn.mass_univariate._utils import calculate_tfce

    t = _smooth_map(rng)
    dh = t.max() / 37                       # nilearn rounds max/dh to a step count: 37 here
    ours = stats.tfce_transform(t, dh=dh)
    ref = calculate_tfce(t[..., None], ndimage.generate_binary_structure(3, 1), dh=dh,
                         two_sided_test=False)[..., 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9 * ref.max())


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_fixed_step_matches_definition_on_a_masked_map(rng, connectivity):
    t = _smooth_map(rng, (14, 15, 13))
    mask = np.zeros(t.shape, bool)
    mask[1:13, 2:14, 1:12] = True
    mask[7, :, :] = False                   # a wall: clusters must not cross it
    dh = 0.137                              # randomise keeps a step fixed across permutations
    ours = stats.tfce_transform(t, mask, dh=dh, connectivity=connectivity)
    ref = _definition(t, mask, stats.tfce_thresholds(t[mask].max(), dh), connectivity)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-9)
    assert np.all(ours[~mask] == 0)


def test_thresholds_rules():
    np.testing.assert_allclose(stats.tfce_thresholds(2.0, n_steps=4), [0.5, 1.0, 1.5, 2.0])
    # fixed step: up to the maximum, the top step clipped to it (the top voxel counts)
    np.testing.assert_allclose(stats.tfce_thresholds(1.0, dh=0.3), [0.3, 0.6, 0.9])
    assert stats.tfce_thresholds(1.0, dh=0.01)[-1] == 1.0
    assert stats.tfce_thresholds(-1.0).size == 0


def test_known_answers():
    t = np.zeros((4, 4, 4))
    t[1, 1, 1] = 2.0
    # one voxel, steps 1 and 2: 1^0.5 * (1^2 + 2^2)
    assert stats.tfce_transform(t, n_steps=2)[1, 1, 1] == pytest.approx(5.0)
    t[1, 1, 2] = 1.0
    out = stats.tfce_transform(t, n_steps=2)
    # step 1: cluster of 2 voxels; step 2: the 2.0 voxel alone
    assert out[1, 1, 2] == pytest.approx(np.sqrt(2) * 1.0)
    assert out[1, 1, 1] == pytest.approx(np.sqrt(2) * 1.0 + 1.0 * 4.0)
    # diagonal neighbours join only with 26-connectivity
    t2 = np.zeros((4, 4, 4))
    t2[1, 1, 1] = t2[2, 2, 2] = 1.0
    assert stats.tfce_transform(t2, n_steps=1, connectivity=6)[1, 1, 1] == pytest.approx(1.0)
    assert stats.tfce_transform(t2, n_steps=1, connectivity=26)[1, 1, 1] == pytest.approx(np.sqrt(2))


def test_argument_checks(rng):
    t = rng.normal(size=(5, 5, 5))
    with pytest.raises(ValueError, match="connectivity"):
        stats.tfce_transform(t, connectivity=8)
    with pytest.raises(ValueError, match="3-dimensional"):
        stats.tfce_transform(t[0])
    with pytest.raises(ValueError, match="dh"):
        stats.tfce_transform(t, dh=0.0)
    with pytest.raises(ValueError, match="selects no voxel"):
        stats.tfce_transform(t, np.zeros(t.shape, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats.tfce_transform(np.full((5, 5, 5), -1.0))   # nothing positive: zeros, no warning
