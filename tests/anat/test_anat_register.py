"""Registration: a known scaling is recovered, results repeat exactly for a seed, similarity metric."""

from __future__ import annotations

import numpy as np
import pytest

from bidsapp.anat.grid import new_image, resample_to_grid
from bidsapp.anat.modulate import jacobian_determinant
from bidsapp.anat.register import apply_transform, register_to_template, registration_similarity
from bidsapp.templates import get_template

_RES = 4.0  # a coarse grid keeps each registration to a few seconds
_SCALE = 1.1


@pytest.fixture(scope="module")
def scaled_subject():
    """The template enlarged by 10 % in every direction (volume x 1.331), shifted, on a 2 mm grid."""
    tpl = get_template(2.0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-120.0, -150.0, -90.0]
    shape = (120, 140, 110)
    # subject world point x shows the template at (x - shift) / scale
    shift = np.array([6.0, -4.0, 3.0])
    src_t1 = new_image(tpl.t1w.get_fdata(), _scaled_affine(tpl.affine, shift))
    src_mask = new_image(tpl.mask.get_fdata(), _scaled_affine(tpl.affine, shift))
    t1 = resample_to_grid(src_t1, shape, affine, antialias=False)
    mask = new_image(resample_to_grid(src_mask, shape, affine, antialias=False).get_fdata() > 0.5, affine, np.uint8)
    return new_image(t1.get_fdata() * 1000.0, affine), mask


def _scaled_affine(affine, shift):
    out = np.asarray(affine, float).copy()
    out[:3, :] *= _SCALE
    out[:3, 3] += shift
    return out


def test_known_scaling_is_recovered_and_repeats_exactly(scaled_subject, tmp_path):
    t1, mask = scaled_subject
    ref = get_template(_RES)
    fwd, inv = register_to_template(t1, mask, tmp_path / "a", resolution_mm=_RES, random_seed=3, omp_nthreads=2)
    assert fwd.name == "anat2std_Composite.h5" and inv.is_file()
    jac = jacobian_determinant(fwd, ref.t1w).get_fdata()
    inside = ref.mask.get_fdata() > 0
    assert np.mean(jac[inside]) == pytest.approx(_SCALE**3, rel=0.03)
    warped = apply_transform(t1, fwd, ref.t1w)
    assert registration_similarity(warped, ref.t1w, ref.mask) > 0.95
    # the inverse brings the (4 mm, hence blurrier) template back onto the subject; the wrong
    # direction would leave it 21 % too small and shifted
    sub_inside = mask.get_fdata() > 0
    back = apply_transform(ref.t1w, inv, t1).get_fdata()[sub_inside]
    wrong = apply_transform(ref.t1w, fwd, t1).get_fdata()[sub_inside]
    assert np.corrcoef(back, t1.get_fdata()[sub_inside])[0, 1] > 0.9
    assert np.corrcoef(wrong, t1.get_fdata()[sub_inside])[0, 1] < 0.8
    # same seed, same thread count: bit-identical result
    fwd2, _ = register_to_template(t1, mask, tmp_path / "b", resolution_mm=_RES, random_seed=3, omp_nthreads=2)
    np.testing.assert_array_equal(apply_transform(t1, fwd2, ref.t1w).get_fdata(), warped.get_fdata())


def test_similarity_definition():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 10, 10))
    mask = new_image(np.ones((10, 10, 10)), np.eye(4), np.uint8)
    assert registration_similarity(new_image(a, np.eye(4)), new_image(3 * a + 2, np.eye(4)), mask) == pytest.approx(1.0)
    assert registration_similarity(new_image(a, np.eye(4)), new_image(-a, np.eye(4)), mask) == pytest.approx(-1.0)
    assert np.isnan(registration_similarity(new_image(a, np.eye(4)), new_image(np.ones_like(a), np.eye(4)), mask))


def test_apply_transform_checks_its_arguments(tmp_path):
    img = new_image(np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(FileNotFoundError):
        apply_transform(img, tmp_path / "missing.h5", img)
    with pytest.raises(ValueError, match="interpolation"):
        apply_transform(img, tmp_path / "missing.h5", img, interpolation="cubic")
