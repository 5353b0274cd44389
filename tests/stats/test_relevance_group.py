"""Seed 002 relevance-map analyses of the group level on small grids with planted effects.

One-sample sign-flip test of |relevance| (Fig. 5), old vs young (Fig. 6a) and the brain-PAD
slope with age and age^2 as covariates (Fig. S3); t statistics checked against statsmodels,
scipy and nilearn.
"""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy import stats as sps

from bidsapp.group import (GroupOptions, _model_pad, _relevance_age_groups, _relevance_onesample,
                           _relevance_pad)

SHAPE = (10, 12, 10)
MASK = np.ones(SHAPE, bool)
OPTIONS = GroupOptions(n_perm=200)


def _ball(centre, radius):
    dist = np.sqrt(np.sum((np.indices(SHAPE) - np.array(centre)[:, None, None, None]) ** 2, axis=0))
    return dist.ravel(), (dist <= radius).ravel()


def _smooth(rng, n):
    data = ndimage.gaussian_filter(rng.standard_normal((n,) + SHAPE), (0, 1.0, 1.0, 1.0))
    return data.reshape(n, -1) / data.std()


def _nilearn(tested, target, confounds, intercept):
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    masker = NiftiMasker(nib.Nifti1Image(MASK.astype(np.uint8), np.eye(4))).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return permuted_ols(tested, target, confounding_vars=confounds, model_intercept=intercept,
                            n_perm=0, two_sided_test=False, tfce=True, masker=masker,
                            output_type="dict", verbose=0)


def test_onesample_finds_consistently_nonzero_relevance_only(rng):
    n = 24
    dist, blob = _ball((3, 6, 5), 2.5)
    # inside: |relevance| ~ 1 in every scan, positive in half of them (signed mean ~ 0);
    # outside: non-zero in ~5 % of the scans only, as sparse LRP maps are
    signs = rng.permutation(np.repeat([-1.0, 1.0], n // 2))[:, None]
    data = np.where(rng.random((n, blob.size)) < 0.05, rng.normal(0, 3, (n, blob.size)), 0.0)
    data[:, blob] = signs * (1.0 + 0.3 * rng.standard_normal((n, blob.sum())))
    test = _relevance_onesample(data, MASK, OPTIONS, random_state=1)
    res = test.result
    assert res.scheme == "sign-flip" and res.n_perm == 200 and res.t.shape == (1, blob.size)
    assert test.directions == (("Mean", "Zero"),)
    p = res.tfce_p_fwe[0]
    assert np.all(p[blob] <= 0.05)
    assert not np.any(p[dist >= 4.5] <= 0.05)
    assert abs(np.mean(data[:, blob])) < 0.1            # signed relevance would show nothing
    # references: one-sample t of |relevance| (scipy, statsmodels OLS on an intercept),
    # nilearn's unpermuted TFCE (per-map steps) and one-sample d = mean / SD
    import statsmodels.api as sm

    absd = np.abs(data)
    varying = np.ptp(absd, axis=0) > 0
    np.testing.assert_allclose(res.t[0][varying], sps.ttest_1samp(absd[:, varying], 0).statistic,
                               rtol=1e-10)
    assert np.all(res.t[0][~varying] == 0)
    j = int(np.flatnonzero(blob)[3])
    assert res.t[0, j] == pytest.approx(sm.OLS(absd[:, j], np.ones(n)).fit().tvalues[0], rel=1e-10)
    np.testing.assert_allclose(test.effect[0][varying],
                               absd[:, varying].mean(0) / absd[:, varying].std(0, ddof=1), rtol=1e-12)
    assert np.all(test.effect[0][~varying] == 0)
    # nilearn needs every voxel to vary: a dense map with the same blob
    dense = data + 0.2 * rng.standard_normal(data.shape)
    per_map = _relevance_onesample(dense, MASK, GroupOptions(n_perm=20, tfce_steps="per-map"))
    ref = _nilearn(np.ones((n, 1)), np.abs(dense), None, False)
    np.testing.assert_allclose(per_map.result.tfce[0], ref["tfce"][0], rtol=1e-6)
    np.testing.assert_allclose(per_map.result.t[0], ref["t"][0], rtol=1e-8)
    # the options are respected: no TFCE, voxelwise max-t only
    maxt = _relevance_onesample(data, MASK, GroupOptions(n_perm=50, tfce=False))
    assert maxt.result.tfce is None and maxt.result.n_perm == 50
    assert np.all(maxt.result.p_fwe[0][blob] <= 0.05)


def test_old_vs_young_finds_the_planted_blob(rng):
    n = 30
    age = np.linspace(20, 80, n)
    dist, blob = _ball((5, 4, 5), 2.5)
    data = _smooth(rng, n)
    data[:, blob] += 1.5 * ((age[:, None] - 50) / 15)     # relevance rises with age in the blob
    test = _relevance_age_groups(data, age, MASK, OPTIONS, random_state=2)
    old, young = age >= 60, age <= 40
    assert test.meta["NOld"] == old.sum() == 10 and test.meta["NYoung"] == young.sum() == 10
    assert test.directions == (("Old", "Young"), ("Young", "Old"))
    res = test.result
    assert res.scheme == "permutation" and res.dof == 18      # the middle-aged are left out
    np.testing.assert_allclose(res.t[0], sps.ttest_ind(data[old], data[young]).statistic, rtol=1e-10)
    np.testing.assert_allclose(res.t[1], -res.t[0], rtol=1e-12)
    assert np.mean(res.tfce_p_fwe[0][dist <= 1.5] <= 0.05) == 1.0
    assert not np.any(res.tfce_p_fwe[0][dist >= 5.5] <= 0.05)
    assert not np.any(res.tfce_p_fwe[1] <= 0.05)
    assert np.median(test.effect[0][dist <= 1.5]) > 2.0
    np.testing.assert_allclose(test.effect[1], -test.effect[0])


def test_too_few_scans_skip_with_a_reason(rng, caplog):
    data = rng.normal(size=(8, MASK.sum()))
    age = np.array([30, 50, 55, 61, 62, 70, 75, np.nan])         # one young scan
    with caplog.at_level(logging.WARNING, logger="brainage.group"):
        assert _relevance_age_groups(data, age, MASK, OPTIONS, label="xrelevance") is None
        assert _relevance_pad(data[:5], rng.normal(size=5), age[:5], MASK, OPTIONS,
                              label="xrelevance") is None
        assert _relevance_onesample(data[:1], MASK, OPTIONS, label="xrelevance") is None
    text = caplog.text
    assert "found 1 young and 4 old; skipped" in text
    assert "needs >= 6 scans with brain-PAD and age, found 5" in text
    assert "needs >= 2 scans, found 1" in text
    # a brain-PAD that age and age^2 explain carries no information of its own
    a = age[:7]
    with caplog.at_level(logging.WARNING, logger="brainage.group"):
        assert _relevance_pad(data[:7], 0.2 * (a - 50) ** 2 - a, a, MASK, OPTIONS) is None
    assert "function of age and age^2" in caplog.text


def test_pad_glm_t_matches_statsmodels_and_nilearn(rng):
    import statsmodels.api as sm

    n = 25
    age = rng.uniform(20, 80, n)
    pad = rng.normal(0, 5, n) + 0.05 * (age - 50)
    data = _smooth(rng, n) + 0.3 * pad[:, None] + 0.01 * (age[:, None] - 50) ** 2
    test = _relevance_pad(data, pad, age, MASK, GroupOptions(n_perm=20, tfce=False))
    res = test.result
    assert res.scheme == "permutation" and res.dof == n - 4 and res.tfce is None
    design = np.column_stack([np.ones(n), pad, age, age**2])      # raw age: same t for PAD
    for j in (0, 17, 600, data.shape[1] - 1):
        fit = sm.OLS(data[:, j], design).fit()
        assert res.t[0, j] == pytest.approx(fit.tvalues[1], rel=1e-9)
        assert res.t[1, j] == pytest.approx(-fit.tvalues[1], rel=1e-9)
        # partial correlation from the residuals of PAD and relevance on (1, age, age^2)
        z = design[:, [0, 2, 3]]
        ry = data[:, j] - z @ np.linalg.lstsq(z, data[:, j], rcond=None)[0]
        rp = pad - z @ np.linalg.lstsq(z, pad, rcond=None)[0]
        assert test.effect[0, j] == pytest.approx(np.corrcoef(ry, rp)[0, 1], rel=1e-9)
    ref = _nilearn(pad[:, None], data, np.column_stack([age, age**2]), True)
    np.testing.assert_allclose(res.t[0], ref["t"][0], rtol=1e-8)
    assert test.meta["Covariates"] == ["age", "age^2"] and test.meta["N"] == n


def test_pad_glm_finds_pad_blob_but_not_a_pure_age_blob(rng):
    from bidsapp import stats

    n = 40
    age = rng.uniform(20, 80, n)
    u = (age - 50) / 15
    pad = 3.0 * (u**2 - np.mean(u**2)) + rng.normal(0, 3, n)     # PAD confounded with age^2
    dist_a, blob_a = _ball((3, 3, 5), 2.5)
    dist_b, blob_b = _ball((6, 9, 5), 2.5)
    data = _smooth(rng, n)
    data[:, blob_a] += 0.3 * pad[:, None]                          # relevance follows PAD
    data[:, blob_b] += (2.0 * u**2 + u)[:, None]                   # relevance follows age only
    test = _relevance_pad(data, pad, age, MASK, OPTIONS, random_state=3)
    p_pos, p_neg = test.result.tfce_p_fwe
    assert np.mean(p_pos[dist_a <= 1.5] <= 0.05) == 1.0
    assert not np.any(p_pos[dist_b <= 4.0] <= 0.05)                # the age blob is not PAD
    assert not np.any(p_pos[(dist_a >= 5.5)] <= 0.05)
    assert not np.any(p_neg <= 0.05)
    assert np.median(test.effect[0][dist_a <= 1.5]) > 0.4
    # without the covariates the age blob would pass for a PAD effect
    naive = stats.permutation_test(data, np.column_stack([np.ones(n), pad]), [0, 1], mask=MASK,
                                   n_perm=200, tfce=True, random_state=3)
    assert np.mean(naive.tfce_p_fwe[0][dist_b <= 1.5] <= 0.05) == 1.0


def test_brain_pad_of_the_maps_model_with_logged_fallbacks(caplog):
    table = pd.DataFrame({"brain_age": [50.0, 61.0, 40.0], "age": [45.0, 60.0, 42.0],
                          "brain_pad_corrected": [4.0, np.nan, -1.0]}, index=[3, 5, 7])
    per_model = {"densenet-clinical": table}
    ctx = SimpleNamespace(options=GroupOptions())
    rows = np.array([7, 3, 5, 9])
    with caplog.at_level(logging.WARNING, logger="brainage.group"):
        # maps are named desc-densenetclinical: the '-' of the model id is dropped
        pad, source = _model_pad(ctx, per_model, "densenetclinical", rows)
    np.testing.assert_array_equal(pad, [-1.0, 4.0, np.nan, np.nan])
    assert source == "bias-corrected brain-PAD of densenet-clinical (linear-age)"
    assert "1 scan(s) without a bias-corrected brain-PAD" in caplog.text
    caplog.clear()
    no_fit = {"densenet-clinical": table.assign(brain_pad_corrected=np.nan)}
    with caplog.at_level(logging.WARNING, logger="brainage.group"):
        pad, source = _model_pad(ctx, no_fit, "densenetclinical", rows)
    np.testing.assert_array_equal(pad, [-2.0, 5.0, 1.0, np.nan])      # brain age - age
    assert source.startswith("uncorrected") and "using the uncorrected brain-PAD" in caplog.text
    pad, source = _model_pad(SimpleNamespace(options=GroupOptions(bias_correction="none")), per_model,
                             "densenetclinical", rows)
    np.testing.assert_array_equal(pad, [-2.0, 5.0, 1.0, np.nan])
    assert "no bias correction asked" in source
    assert _model_pad(ctx, per_model, "mlens", rows) == (None, "no *_brainage.tsv rows of model 'mlens'")
