"""Univariate tests against reference libraries (scipy, pingouin, statsmodels) to 1e-8."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bidsapp import stats

RTOL = 1e-8


@pytest.fixture
def two_groups(rng):
    return rng.normal(1.0, 2.0, 17), rng.normal(0.2, 1.0, 23)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_welch_matches_scipy(two_groups, alternative):
    a, b = two_groups
    ours = stats.welch_ttest(a, b, alternative=alternative)
    ref = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
    np.testing.assert_allclose(ours.statistic, ref.statistic, rtol=RTOL)
    np.testing.assert_allclose(ours.pvalue, ref.pvalue, rtol=RTOL)
    np.testing.assert_allclose(ours.df, ref.df, rtol=RTOL)


def test_welch_vectorised_over_voxels(rng):
    a, b = rng.normal(0, 1, (9, 50)), rng.normal(0.5, 3, (14, 50))
    ours = stats.welch_ttest(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False, axis=0)
    np.testing.assert_allclose(ours.statistic, ref.statistic, rtol=RTOL)
    np.testing.assert_allclose(ours.pvalue, ref.pvalue, rtol=RTOL)
    np.testing.assert_allclose(ours.df, ref.df, rtol=RTOL)


def test_welch_known_answer():
    # t = (2.5 - 6) / sqrt(5/3/4 + 10/5), df from eq. 2 by hand
    res = stats.welch_ttest([1, 2, 3, 4], [2, 4, 6, 8, 10])
    se2 = (5 / 3) / 4 + 10 / 5
    assert res.statistic == pytest.approx(-3.5 / np.sqrt(se2), rel=1e-12)
    assert res.df == pytest.approx(se2**2 / (((5 / 3) / 4) ** 2 / 3 + (10 / 5) ** 2 / 4), rel=1e-12)


def test_cohens_d_matches_pingouin(two_groups):
    pg = pytest.importorskip("pingouin")
    a, b = two_groups
    assert stats.cohens_d(a, b) == pytest.approx(pg.compute_effsize(a, b, eftype="cohen"), rel=RTOL)
    assert stats.welch_ttest(a, b).effect_size == pytest.approx(stats.cohens_d(a, b), rel=1e-12)


def test_bonferroni_known_answer():
    np.testing.assert_allclose(stats.bonferroni([0.01, 0.2, np.nan, 0.5]), [0.03, 0.6, np.nan, 1.0])
    np.testing.assert_allclose(stats.bonferroni([0.01], n_tests=7), [0.07])
    with pytest.raises(ValueError, match="n_tests"):
        stats.bonferroni([0.1], n_tests=0)


def _three_groups(rng):
    y = np.r_[rng.normal(0, 1, 10), rng.normal(1, 2, 12), rng.normal(0.5, 1, 9), rng.normal(2, 0.5, 7)]
    g = np.array(["a"] * 10 + ["b"] * 12 + ["c"] * 9 + ["d"] * 7)
    return y, g


def test_welch_anova_matches_pingouin(rng):
    pg = pytest.importorskip("pingouin")
    y, g = _three_groups(rng)
    ours = stats.welch_anova(y, g)
    ref = pg.welch_anova(pd.DataFrame({"y": y, "g": g}), dv="y", between="g").iloc[0]
    assert ours.statistic == pytest.approx(ref["F"], rel=RTOL)
    assert ours.df[1] == pytest.approx(ref["ddof2"], rel=RTOL)
    assert ours.df[0] == ref["ddof1"]
    assert ours.pvalue == pytest.approx(ref["p_unc"], rel=RTOL)
    assert ours.effect_size == pytest.approx(ref["np2"], rel=RTOL)


def test_games_howell_matches_pingouin(rng):
    pg = pytest.importorskip("pingouin")
    y, g = _three_groups(rng)
    ours = stats.games_howell(y, g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pg.pairwise_gameshowell(pd.DataFrame({"y": y, "g": g}), dv="y", between="g")
    assert list(zip(ours.A, ours.B)) == list(zip(ref.A, ref.B))
    for col in ("diff", "se", "T", "df", "pval"):
        np.testing.assert_allclose(ours[col], ref[col], rtol=RTOL)


@pytest.mark.parametrize("usevar", ["pooled", "unequal"])
def test_ztest_matches_statsmodels(two_groups, usevar):
    from statsmodels.stats.weightstats import ztest

    a, b = two_groups
    ours = stats.ztest_2samp(a, b, usevar=usevar, value=0.3)
    z, p = ztest(a, b, value=0.3, usevar=usevar)
    assert ours.statistic == pytest.approx(z, rel=RTOL)
    assert ours.pvalue == pytest.approx(p, rel=RTOL)


def test_ks_matches_scipy_and_hand_value(two_groups):
    a, b = two_groups
    ref = sps.ks_2samp(a, b)
    ours = stats.ks_2samp(a, b)
    assert ours.statistic == pytest.approx(ref.statistic, rel=RTOL)
    assert ours.pvalue == pytest.approx(ref.pvalue, rel=RTOL)
    # D by hand: ECDFs of {1,2,3} and {2.5,3.5,4.5,5.5} differ most at x=3 (1 - 1/4)
    assert stats.ks_2samp([1, 2, 3], [2.5, 3.5, 4.5, 5.5]).statistic == pytest.approx(0.75)


def test_pearson_matches_scipy(rng):
    x = rng.normal(size=40)
    y = 0.4 * x + rng.normal(size=40)
    ref = sps.pearsonr(x, y)
    ours = stats.pearson(x, y)
    assert ours.statistic == pytest.approx(ref.statistic, rel=RTOL)
    assert ours.pvalue == pytest.approx(ref.pvalue, rel=RTOL)
    ys = rng.normal(size=(40, 6)) + x[:, None] * np.linspace(0, 1, 6)
    vec = stats.pearson(x[:, None], ys)
    for j in range(6):
        r = sps.pearsonr(x, ys[:, j])
        assert vec.statistic[j] == pytest.approx(r.statistic, rel=RTOL)
        assert vec.pvalue[j] == pytest.approx(r.pvalue, rel=RTOL)


def test_pearson_drops_missing_pairs():
    x = np.array([1.0, 2, 3, 4, np.nan, 6])
    y = np.array([2.0, 1, 4, 3, 5, np.nan])
    ref = sps.pearsonr([1, 2, 3, 4], [2, 1, 4, 3])
    assert stats.pearson(x, y).statistic == pytest.approx(ref.statistic, rel=1e-12)


def test_correlate_covariates_planted_survival(rng):
    n = 300
    pad = rng.normal(size=n)
    cov = pd.DataFrame({"survival": 0.5 * pad + rng.normal(size=n), "noise": rng.normal(size=n),
                        "site": ["a", "b"] * (n // 2)})
    out = stats.correlate_covariates(pad, cov).set_index("variable")
    assert list(out.index) == ["survival", "noise"]      # the text column is skipped
    assert out.loc["survival", "p_bonferroni"] < 1e-10
    assert out.loc["noise", "p_bonferroni"] == pytest.approx(min(1, 2 * out.loc["noise", "p"]))


def test_sliding_windows_find_the_planted_window(rng):
    n = 600
    age = rng.uniform(20, 80, n)
    pad = rng.normal(size=n)
    bmi = rng.normal(size=n)
    old = age >= 60
    bmi[old] = pad[old] + 0.3 * rng.normal(size=old.sum())   # association only after 60
    out = stats.sliding_window_correlations(age, pad, pd.DataFrame({"bmi": bmi}), width=10, step=5)
    assert list(out["window_start"]) == [20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70]
    assert np.all(out["window_end"] - out["window_start"] == 10)
    sig = out[out["p_bonferroni"] <= 0.05]
    # windows wholly after 60 find it, windows wholly before do not (55-65 overlaps both)
    assert {60, 65, 70} <= set(sig["window_start"]) <= {55, 60, 65, 70}
    assert np.all(out.loc[out["window_start"] >= 60, "r"] > 0.8)


def test_argument_checks():
    with pytest.raises(ValueError, match="alternative"):
        stats.welch_ttest([1, 2, 3], [1, 2, 3], alternative="bigger")
    with pytest.raises(ValueError, match="at least 2"):
        stats.welch_ttest([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="usevar"):
        stats.ztest_2samp([1, 2], [3, 4], usevar="pool")
    with pytest.raises(TypeError, match="covariates"):
        stats.correlate_covariates([1, 2, 3], {"a": [1, 2, 3]})
