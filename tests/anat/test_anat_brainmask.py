"""Brain extraction: skull-stripped-input detection, foreground masks, deepbet on a brain-only image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from bidsapp.anat.brainmask import (SKULL_STRIPPED_MAX_ML, extract_brain, extracranial_volume_ml,
                                    foreground_mask)
from bidsapp.anat.grid import new_image
from bidsapp.anat.qc import mask_volume_ml
from bidsapp.templates import get_template


def _rician(data: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.hypot(data + rng.normal(0, sigma, data.shape), rng.normal(0, sigma, data.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def template_2mm():
    tpl = get_template(2.0)
    return tpl.t1w.get_fdata(dtype=np.float32) * 1000.0, tpl.mask, tpl.affine


def test_stripped_brain_with_rician_noise_has_no_extracranial_tissue(template_2mm):
    t1, mask, affine = template_2mm
    noisy = _rician(t1, sigma=0.05 * np.median(t1[mask.get_fdata() > 0]), seed=0)  # SNR 20
    assert extracranial_volume_ml(new_image(noisy, affine), mask) < 1.0


def test_a_scalp_shell_is_extracranial_tissue(template_2mm):
    t1, mask, affine = template_2mm
    inside = mask.get_fdata() > 0
    dist = ndi.distance_transform_edt(~inside, sampling=2.0)
    head = t1 + np.where((dist > 8) & (dist <= 14), 700.0, 0.0).astype(np.float32)  # 6 mm of 'scalp fat'
    volume = extracranial_volume_ml(new_image(head, affine), mask)
    assert volume > 5 * SKULL_STRIPPED_MAX_ML


def test_foreground_mask_of_a_stripped_brain(template_2mm):
    t1, mask, affine = template_2mm
    noisy = _rician(t1, sigma=0.04 * np.median(t1[mask.get_fdata() > 0]), seed=1)
    fg = foreground_mask(new_image(noisy, affine))
    assert fg.get_data_dtype() == np.uint8
    assert mask_volume_ml(fg) == pytest.approx(mask_volume_ml(mask), rel=0.05)
    dice = 2 * np.sum((fg.get_fdata() > 0) & (mask.get_fdata() > 0)) / (fg.get_fdata().sum() + mask.get_fdata().sum())
    assert dice > 0.95


def test_deepbet_on_a_brain_only_image_takes_the_stripped_path(template_2mm):
    t1, mask, affine = template_2mm
    brain, info = extract_brain(new_image(t1, affine), omp_nthreads=1)
    assert info["skull_stripped_input"] is True
    assert info["extracranial_ml"] < SKULL_STRIPPED_MAX_ML
    assert any("skull-stripped" in w for w in info["warnings"])
    assert info["mask_volume_ml"] == pytest.approx(mask_volume_ml(mask), rel=0.05)
    # deepbet itself also finds a brain of about the right size
    assert 1500 < info["deepbet_volume_ml"] < 2200
