"""Age-bias corrections: known answers and planted effects."""

from __future__ import annotations

import numpy as np
import pytest

from bidsapp import stats


def _cohort(rng, n, offset=0.0):
    age = rng.uniform(20, 85, n)
    # regression towards the training mean (50 y): the classic age bias of brain age
    predicted = 50 + 0.6 * (age - 50) + offset + rng.normal(0, 3, n)
    return age, predicted


@pytest.mark.parametrize("method", ["linear-age", "linear-predicted", "extremes"])
def test_correction_removes_bias_and_keeps_planted_offset(rng, method):
    age_c, pred_c = _cohort(rng, 400)
    age_p, pred_p = _cohort(rng, 400, offset=5.0)   # patients: brains 5 y "older"
    raw_r = stats.pearson(age_c, pred_c - age_c).statistic
    assert raw_r < -0.8
    fit = stats.fit_bias_correction(method, age=age_c, predicted=pred_c)
    pad_c = fit.apply(age=age_c, predicted=pred_c)
    pad_p = fit.apply(age=age_p, predicted=pred_p)
    if method == "linear-age":
        # least-squares residuals are uncorrelated with their regressor: exactly 0
        assert abs(stats.pearson(age_c, pad_c).statistic) < 1e-10
        assert abs(pad_c.mean()) < 1e-10
    elif method == "linear-predicted":
        # eq. 8 decorrelates the delta from the *predicted* age
        assert abs(stats.pearson(pred_c, pad_c).statistic) < 1e-10
    else:
        assert abs(stats.pearson(age_c, pad_c).statistic) < 0.15
    # the planted 5-year offset of the patients survives every correction
    assert pad_p.mean() - pad_c.mean() > 4.0
    assert stats.welch_ttest(pad_p, pad_c, alternative="greater").pvalue < 1e-10


def test_linear_age_known_answer():
    age = np.array([20.0, 40, 60, 80])
    pred = np.array([30.0, 44, 58, 72])             # delta = 10 - 0.3 * (age - 20)
    fit = stats.fit_bias_correction("linear-age", age=age, predicted=pred)
    assert fit.slope == pytest.approx(-0.3) and fit.intercept == pytest.approx(16.0)
    np.testing.assert_allclose(fit.apply(age=age, predicted=pred), 0.0, atol=1e-12)
    assert fit.apply(age=[50.0], predicted=[55.0])[0] == pytest.approx(5.0 - (-0.3 * 50 + 16))


def test_linear_predicted_known_answer():
    pred = np.array([30.0, 40, 50, 60])
    age = pred - (2.0 + 0.5 * pred)                # delta = 2 + 0.5 * predicted
    fit = stats.fit_bias_correction("linear-predicted", age=age, predicted=pred)
    assert fit.slope == pytest.approx(0.5) and fit.intercept == pytest.approx(2.0)


def test_extremes_uses_only_the_youngest_and_oldest_five_percent():
    age = np.arange(20.0, 60.0)                     # 40 controls: 2 youngest + 2 oldest
    pred = age.copy()
    pred[[0, 1]] = [30.0, 30.5]                     # y = 0.5 x + 20 through the extremes
    pred[[38, 39]] = [49.0, 49.5]
    pred[2:38] = 1000.0                             # middle ones must not matter
    fit = stats.fit_bias_correction("extremes", age=age, predicted=pred)
    assert fit.n_fit == 4
    assert fit.slope == pytest.approx(0.5) and fit.intercept == pytest.approx(20.0)
    # y' = y + x - (a x + b): corrected delta y - (a x + b)
    assert fit.apply(age=[40.0], predicted=[45.0])[0] == pytest.approx(45.0 - 40.0)


def test_agebin_bins_and_voxelwise_means():
    edges = stats.age_bins(41.0)
    np.testing.assert_allclose(edges, [18, 25, 30, 35, 40, 45])
    age = np.array([19.0, 24, 26, 29, 31, 44, 44])
    delta = np.array([[1.0, 10], [3, 20], [5, 30], [7, 40], [9, 50], [2, 2], [4, 4]])
    fit = stats.fit_bias_correction("agebin", age=age, predicted=delta + age[:, None])
    np.testing.assert_allclose(fit.bin_means[0], [2, 15])
    np.testing.assert_allclose(fit.bin_means[1], [6, 35])
    np.testing.assert_allclose(fit.bin_means[2], [9, 50])
    assert np.all(np.isnan(fit.bin_means[3]))
    out = fit.apply(age=np.array([20.0, 33, 37]), predicted=np.array([[22.0, 22], [40, 40], [40, 40]]))
    np.testing.assert_allclose(out[0], [2 - 2, 2 - 15])
    np.testing.assert_allclose(out[1], [7 - 9, 7 - 50])
    assert np.all(np.isnan(out[2]))                 # 35-40 bin has no control


def test_agebin_removes_planted_voxel_bias(rng):
    n, v = 600, 30
    age = rng.uniform(18, 80, n)
    slope = np.linspace(-0.5, 0.2, v)               # a different age bias in every voxel
    delta = (age[:, None] - 50) * slope + rng.normal(0, 1, (n, v))
    fit = stats.fit_bias_correction("agebin", age=age, predicted=delta + age[:, None])
    out = fit.apply(age=age, predicted=delta + age[:, None])
    r = stats.pearson(age[:, None], out).statistic
    assert np.max(np.abs(r)) < 0.15
    assert np.max(np.abs(stats.pearson(age[:, None], delta).statistic)) > 0.9


@pytest.mark.parametrize("method", ["linear-age", "extremes", "agebin"])
def test_round_trip_through_json_dict(rng, method):
    age, pred = _cohort(rng, 120)
    fit = stats.fit_bias_correction(method, age=age, predicted=pred)
    again = stats.bias_correction_from_dict(fit.to_dict())
    np.testing.assert_allclose(again.apply(age=age, predicted=pred), fit.apply(age=age, predicted=pred))


def test_argument_checks(rng):
    with pytest.raises(ValueError, match="method"):
        stats.fit_bias_correction("quadratic", age=[1, 2, 3], predicted=[1, 2, 3])
    with pytest.raises(ValueError, match="3 controls"):
        stats.fit_bias_correction("linear-age", age=[1, 2], predicted=[1, 2])
    with pytest.raises(ValueError, match="lacks"):
        stats.bias_correction_from_dict({"method": "linear-age", "slope": 1.0})
