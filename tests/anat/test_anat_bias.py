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
    # a coarser fit than the default keeps the test fast; the mechanism is the same
    fast = dict(fit_resolution_mm=8.0, iterations=(50, 50, 50), omp_nthreads=2)
    corrected, field = n4_correct(img, mask_img, **fast)
    assert corrected.shape == img.shape and field.shape == img.shape
    # N4 also flattens the template's own smooth intensity variations (deep grey matter...), so
    # compare with its estimate on the unbiased image: the difference is the planted field
    _, intrinsic = n4_correct(new_image(clean, img.affine), mask_img, **fast)
    est = np.log(field.get_fdata()[mask]) - np.log(intrinsic.get_fdata()[mask])
    assert np.corrcoef(est, log_field[mask])[0, 1] > 0.98
    assert np.polyfit(log_field[mask], est, 1)[0] == pytest.approx(1.0, abs=0.15)
    # corrected = input / field, on the input's intensity scale (field geometric mean 1 in the brain)
    np.testing.assert_allclose(corrected.get_fdata() * field.get_fdata(), img.get_fdata(), rtol=1e-4, atol=1e-2)
    assert abs(np.log(field.get_fdata()[mask]).mean()) < 0.01
    # outside the brain the field is extended (finite, positive, of similar size)
    values = field.get_fdata()
    assert np.isfinite(values).all() and values.min() > 0.3 and values.max() < 3.0


def test_arguments_are_validated(biased):
    img, mask_img, *_ = biased
    with pytest.raises(ValueError, match="resolution_mm"):
        n4_correct(img, mask_img, resolution_mm=0)
    with pytest.raises(ValueError, match="differ in shape"):
        n4_correct(img, resample_to_grid(mask_img, (10, 10, 10), mask_img.affine))
