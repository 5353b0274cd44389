"""N4 on a coarse grid: a planted smooth bias field is recovered and applied at full resolution."""

from __future__ import annotations

import numpy as np
import pytest

from bidsapp.anat.bias import n4_correct
from bidsapp.anat.grid import new_image, resample_to_grid
from bidsapp.templates import get_template


@pytest.fixture(scope="module")
def biased():
    """The template at 1.5 mm (finer than the 2 mm working grid) times exp(linear ramp), +-25 %."""
    tpl = get_template(1.5)
    ref = get_template(2.0)
    t1 = tpl.t1w.get_fdata(dtype=np.float32) * 1000.0
    ijk = np.indices(t1.shape).reshape(3, -1)
    world = tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3:4]
    log_field = (0.0035 * world[0] - 0.0025 * world[2]).reshape(t1.shape).astype(np.float32)
    mask = tpl.mask.get_fdata() > 0
    log_field -= log_field[mask].mean()
    img = new_image(t1 * np.exp(log_field), tpl.affine)
    assert ref.shape != img.shape  # the working grid really differs from the input grid
    return img, tpl.mask, t1, log_field, mask


def test_planted_bias_field_is_recovered(biased):
    img, mask_img, clean, log_field, mask = biased
    corrected, field = n4_correct(img, mask_img, omp_nthreads=1)
    assert corrected.shape == img.shape and field.shape == img.shape
    est = np.log(field.get_fdata()[mask])
    assert np.corrcoef(est, log_field[mask])[0, 1] > 0.95
    # corrected = input / field, on the input's intensity scale (field geometric mean 1 in the brain)
    np.testing.assert_allclose(corrected.get_fdata() * field.get_fdata(), img.get_fdata(), rtol=1e-4, atol=1e-2)
    assert abs(est.mean()) < 0.01
    residual_before = np.std(np.log(img.get_fdata()[mask] + 1) - np.log(clean[mask] + 1))
    residual_after = np.std(np.log(corrected.get_fdata()[mask] + 1) - np.log(clean[mask] + 1))
    assert residual_after < 0.4 * residual_before
    # outside the brain the field is extended (finite, positive, of similar size)
    values = field.get_fdata()
    assert np.isfinite(values).all() and values.min() > 0.3 and values.max() < 3.0


def test_arguments_are_validated(biased):
    img, mask_img, *_ = biased
    with pytest.raises(ValueError, match="resolution_mm"):
        n4_correct(img, mask_img, resolution_mm=0)
    with pytest.raises(ValueError, match="differ in shape"):
        n4_correct(img, resample_to_grid(mask_img, (10, 10, 10), mask_img.affine))
