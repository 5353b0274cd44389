"""Seed-003 input preparation: top-1 % normalisation, resampling, the fixed template window."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bidsapp.errors import ImageError
from bidsapp.templates import get_template
from bidsapp.transforms.mni_affine import (MNIAffineSpec, crop_or_pad_window, prepare_vgg_input,
                                           template_window, top_fraction_mean)


def _brain_image(scale=400.0, seed=0):
    """A brain-masked 'MNI-space T1w' on the 2 mm template grid: the template T1w x scale."""
    tpl = get_template(2.0)
    mask = np.asarray(tpl.mask.dataobj) > 0
    data = tpl.t1w.get_fdata(dtype=np.float32) * 400
    data += np.random.default_rng(seed).normal(0, 2, mask.shape).astype(np.float32)
    data = np.where(mask, np.clip(data, 1, None), 0).astype(np.float32) * (scale / 400)
    return nib.Nifti1Image(data, tpl.affine), mask


def test_top_fraction_mean_known_answers():
    assert top_fraction_mean(np.arange(1.0, 1001.0), 0.01) == pytest.approx(995.5)  # 991..1000
    assert top_fraction_mean(np.array([3.0, 1.0, 2.0]), 0.01) == 3.0  # at least one value
    assert top_fraction_mean(np.arange(10.0), 0.25) == pytest.approx(8.0)  # ceil(2.5) = 3: 7, 8, 9


def test_two_mm_input_keeps_the_template_brain_and_its_top_percent_is_one():
    img, mask = _brain_image()
    spec = MNIAffineSpec(resolution_mm=2.0, shape=(80, 96, 80))
    volume = prepare_vgg_input(img, spec)
    assert volume.shape == (80, 96, 80) and volume.data.dtype == np.float32
    data = img.get_fdata(dtype=np.float32)
    reference = top_fraction_mean(data[mask], 0.01)
    assert volume.history[-1][1]["reference_intensity"] == pytest.approx(reference, rel=1e-6)
    # the whole brain fits in the window: the values are the scan / reference, nothing cut
    assert float(volume.data.sum()) == pytest.approx(float(data.sum() / reference), rel=1e-5)
    brain = volume.data[volume.data > 0]
    assert brain.size == mask.sum()
    assert top_fraction_mean(brain, 0.01) == pytest.approx(1.0, rel=1e-5)
    # the window's affine keeps world positions: output voxel 0 is template voxel `start`
    start = np.array(template_window(2.0, (80, 96, 80)))
    np.testing.assert_allclose(volume.affine[:3, 3], (get_template(2.0).affine @ [*start, 1])[:3])
    # (the window itself is checked with known values below)
    expected = crop_or_pad_window(data / reference, start, (80, 96, 80))
    np.testing.assert_allclose(volume.data, expected, rtol=1e-5, atol=1e-7)


def test_normalisation_removes_the_scanner_scale():
    spec = MNIAffineSpec(resolution_mm=4.0, shape=(40, 48, 40))
    a = prepare_vgg_input(_brain_image(400.0)[0], spec).data
    b = prepare_vgg_input(_brain_image(1234.0)[0], spec).data
    assert a.shape == (40, 48, 40)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_window_is_centred_on_the_template_brain():
    brain = np.asarray(get_template(4.0).mask.dataobj) > 0
    start = template_window(4.0, (40, 48, 40))
    for axis, size in enumerate((40, 48, 40)):
        hits = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = start[axis], start[axis] + size - 1
        assert lo <= hits[0] and hi >= hits[-1]
        assert abs((hits[0] - lo) - (hi - hits[-1])) <= 1  # equal margins up to rounding


def test_crop_or_pad_window_known_values():
    data = np.arange(24.0).reshape(2, 3, 4)
    out = crop_or_pad_window(data, (-1, 1, 2), (4, 2, 3))
    assert out.shape == (4, 2, 3)
    np.testing.assert_array_equal(out[1:3, :, :2], data[:, 1:3, 2:4])
    assert out[0].sum() == 0 and out[3].sum() == 0 and out[:, :, 2].sum() == 0
    np.testing.assert_array_equal(crop_or_pad_window(data, (0, 0, 0), data.shape), data)


def test_spec_round_trip_and_checks():
    spec = MNIAffineSpec.from_dict({"resolution_mm": 4, "shape": [40, 48, 40]})
    assert spec.shape == (40, 48, 40) and spec.resolution_mm == 4.0
    assert MNIAffineSpec.from_dict(spec.to_dict()) == spec
    for bad, match in (({"shape": [16, 48, 40]}, "shape"), ({"resolution_mm": 1.0}, "resolution"),
                       ({"top_fraction": 0.0}, "top_fraction"), ({"size": 3}, "unknown")):
        with pytest.raises(ValueError, match=match):
            MNIAffineSpec.from_dict(bad)


def test_empty_scan_is_refused():
    tpl = get_template(2.0)
    with pytest.raises(ImageError, match="no positive brain voxel"):
        prepare_vgg_input(nib.Nifti1Image(np.zeros(tpl.shape, np.float32), tpl.affine), MNIAffineSpec())
