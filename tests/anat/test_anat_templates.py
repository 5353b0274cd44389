"""The bundled template at 1, 1.5 and 2 mm: grids, priors, CSF prior, file cache."""

from __future__ import annotations

import numpy as np
import pytest

from bidsapp.templates import (TEMPLATE_SPACE, get_template, resolution_label, template_grid,
                               write_template)


def test_space_name_is_the_bundled_template():
    assert TEMPLATE_SPACE == "MNI152NLin2009aSym"


@pytest.mark.parametrize("res, shape", [(1.0, (197, 233, 189)), (1.5, (131, 155, 126)), (2.0, (99, 117, 95))])
def test_grids_share_the_origin_and_cover_the_field_of_view(res, shape):
    grid_shape, affine = template_grid(res)
    assert grid_shape == shape
    np.testing.assert_allclose(affine[:3, 3], [-98.0, -134.0, -72.0])
    np.testing.assert_allclose(np.diag(affine)[:3], [res] * 3)
    last = affine @ np.r_[np.array(shape) - 1, 1.0]
    assert np.all(last[:3] <= np.array([98.0, 98.0, 116.0]) + 1e-6)


@pytest.mark.parametrize("res", [1.0, 1.5, 2.0])
def test_csf_prior_completes_gm_and_wm_inside_the_mask(res):
    tpl = get_template(res)
    mask = tpl.mask.get_fdata() > 0
    gm, wm, csf = (img.get_fdata() for img in tpl.tpms)
    assert csf.min() >= 0.0 and csf.max() <= 1.0
    np.testing.assert_allclose((gm + wm + csf)[mask], 1.0, atol=1e-5)
    assert csf[~mask].max() == 0.0
    assert tpl.t1w.get_data_dtype() == np.float32 and tpl.mask.get_data_dtype() == np.uint8
    assert 0.0 <= tpl.t1w.get_fdata().min() and tpl.t1w.get_fdata().max() <= 1.0


def test_tissue_volumes_agree_across_resolutions():
    ref = get_template(1.0)
    vol = {name: getattr(ref, name).get_fdata().sum() / 1000 for name in ("gm", "wm", "mask")}
    # known values of the bundled 1 mm maps (mL)
    assert vol["gm"] == pytest.approx(1008.2, abs=0.5)
    assert vol["wm"] == pytest.approx(670.3, abs=0.5)
    for res in (1.5, 2.0):
        tpl = get_template(res)
        for name in ("gm", "wm", "mask"):
            assert getattr(tpl, name).get_fdata().sum() * res**3 / 1000 == pytest.approx(vol[name], rel=0.01)


def test_write_template_reuses_complete_files(tmp_path):
    files = write_template(2.0, tmp_path / "cache")
    assert files.gm.name == "tpl-MNI152NLin2009aSym_res-2_label-GM_probseg.nii.gz"
    import nibabel as nib

    np.testing.assert_allclose(nib.load(files.csf).get_fdata(), get_template(2.0).csf.get_fdata())
    mtime = files.t1w.stat().st_mtime_ns
    again = write_template(2, tmp_path / "cache")
    assert again.t1w == files.t1w and files.t1w.stat().st_mtime_ns == mtime


def test_resolution_validation_and_labels():
    assert resolution_label(1.5) == "1p5" and resolution_label(2.0) == "2"
    with pytest.raises(ValueError, match="between 1 and 8"):
        get_template(0.5)
    with pytest.raises(TypeError, match="must be a number"):
        get_template("2")
