"""Permutation inference: reference t statistics, nilearn, exact enumeration, null FWE rates."""

from __future__ import annotations

import warnings
from itertools import combinations, product

import numpy as np
import pytest
from scipy import ndimage
from scipy import stats as sps

from bidsapp import stats

# central 95 % range of the number of rejections among 200 null data sets at alpha = 5 %
N_NULL = 200
LOW, HIGH = (int(v) for v in sps.binom.interval(0.95, N_NULL, 0.05))


def _smooth(rng, n, shape, sigma=1.0):
    data = ndimage.gaussian_filter(rng.standard_normal((n,) + shape), (0,) + (sigma,) * 3)
    return data.reshape(n, -1) / data.std()


def test_t_matches_scipy_and_statsmodels(rng):
    import statsmodels.api as sm

    n = 30
    g = np.r_[np.ones(14), np.zeros(16)]
    y = rng.normal(size=(n, 25)) + 0.5 * g[:, None]
    res = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], n_perm=1)
    ref = sps.ttest_ind(y[g == 1], y[g == 0])        # randomise's t is the pooled-variance GLM t
    np.testing.assert_allclose(res.t[0], ref.statistic, rtol=1e-10)
    age = rng.normal(size=n)
    design = np.c_[np.ones(n), g, age]
    res = stats.permutation_test(y, design, [[0, 1, 0], [0, 0, -1]], n_perm=1)
    for j in (0, 7):
        fit = sm.OLS(y[:, j], design).fit()
        assert res.t[0, j] == pytest.approx(fit.tvalues[1], rel=1e-10)
        assert res.t[1, j] == pytest.approx(-fit.tvalues[2], rel=1e-10)
    assert res.dof == n - 3


def _nilearn_relabellings(seed, n_perm, n):
    """Data-row permutations nilearn draws (random_state=seed, n_jobs=1): tested variable
    shuffled cumulatively with RandomState.permutation after one integer draw."""
    outer = np.random.RandomState(seed)
    inner = np.random.RandomState(outer.randint(1, np.iinfo(np.int32).max - 1))
    order, out = np.arange(n), []
    for _ in range(n_perm):
        order = order[inner.permutation(n)]
        out.append(np.argsort(order))
    return np.asarray(out)


def _nilearn(y, g, mask, n_perm, seed, two_sided):
    import nibabel as nib
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    masker = NiftiMasker(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4))).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return permuted_ols(g[:, None], y, confounding_vars=None, model_intercept=True, n_perm=n_perm,
                            two_sided_test=two_sided, random_state=seed, n_jobs=1, tfce=True,
                            masker=masker, output_type="dict", verbose=0)


def test_identical_to_nilearn_with_the_same_relabellings(rng):
    shape, n = (9, 9, 9), 16
    mask = np.ones(shape, bool)
    g = np.r_[np.ones(8), np.zeros(8)]
    y = _smooth(rng, n, shape)
    y[g == 1] += 1.0 * (np.indices(shape)[0] < 4).ravel()
    ref = _nilearn(y, g, mask, 40, 7, two_sided=True)
    ours = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], mask=mask, tfce=True,
                                  tfce_steps="per-map", two_sided=True,
                                  permutations=_nilearn_relabellings(7, 40, n))
    np.testing.assert_allclose(ours.tfce[0], ref["tfce"][0], rtol=1e-6)
    np.testing.assert_allclose(ours.tfce_p_fwe[0], 10 ** -ref["logp_max_tfce"][0], rtol=1e-10)
    np.testing.assert_allclose(ours.p_fwe[0], 10 ** -ref["logp_max_t"][0], rtol=1e-10)
    assert ours.tfce_p_fwe.min() < 0.1      # the planted slab makes p-values vary


def test_agrees_with_nilearn_within_monte_carlo_error(rng):
    shape, n, n_perm = (10, 10, 10), 20, 200
    mask = np.ones(shape, bool)
    g = np.r_[np.ones(10), np.zeros(10)]
    y = _smooth(rng, n, shape)
    y[g == 1] += 0.5 * (np.indices(shape)[0] < 4).ravel()
    ref = 10 ** -_nilearn(y, g, mask, n_perm, 1, two_sided=False)["logp_max_tfce"][0]
    ours = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], mask=mask, n_perm=n_perm + 1,
                                  tfce=True, tfce_steps="per-map", random_state=2).tfce_p_fwe[0]
    p = (ref + ours) / 2
    # two independent Monte-Carlo estimates: 4 standard errors of their difference, + resolution
    tol = 4 * np.sqrt(p * (1 - p) * 2 / n_perm) + 2 / n_perm
    assert np.all(np.abs(ref - ours) <= tol)
    assert ref.min() < 0.2 and ref.max() > 0.9


def test_exhaustive_two_sample_equals_brute_force(rng):
    n = 8
    g = np.r_[np.ones(4), np.zeros(4)]
    y = rng.normal(size=(n, 6)) + np.linspace(0, 2, 6) * g[:, None]
    res = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], n_perm=5000)
    assert res.exhaustive and res.n_perm == 70 and res.scheme == "permutation"
    t_obs = sps.ttest_ind(y[:4], y[4:]).statistic
    null = []
    for idx in combinations(range(n), 4):
        lab = np.zeros(n, bool)
        lab[list(idx)] = True
        null.append(sps.ttest_ind(y[lab], y[~lab]).statistic)
    null = np.array(null)
    np.testing.assert_allclose(res.p_uncorrected[0], np.mean(null >= t_obs - 1e-9, axis=0))
    np.testing.assert_allclose(res.p_fwe[0], np.mean(null.max(axis=1)[:, None] >= t_obs - 1e-9, axis=0))
    assert res.p_fwe[0].min() >= 1 / 70     # the unpermuted labelling is part of the null


def test_exhaustive_sign_flips_equal_brute_force(rng):
    n = 7
    y = rng.normal(0.8, 1, size=(n, 3))
    res = stats.permutation_test(y, np.ones((n, 1)), [1], n_perm=1000)
    assert res.exhaustive and res.n_perm == 128 and res.scheme == "sign-flip"
    t_obs = sps.ttest_1samp(y, 0).statistic
    null = np.array([sps.ttest_1samp(y * np.array(s)[:, None], 0).statistic
                     for s in product([1, -1], repeat=n)])
    np.testing.assert_allclose(res.p_uncorrected[0], np.mean(null >= t_obs - 1e-9, axis=0))


def test_exchangeability_blocks(rng):
    n = 8
    g = np.array([1, 1, 0, 0, 1, 1, 0, 0.0])
    blocks = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    count, scheme = stats.count_relabellings(np.c_[np.ones(n), g], [0, 1], exchangeability_blocks=blocks)
    assert (count, scheme) == (36, "permutation")           # C(4,2) * C(4,2)
    assert stats.count_relabellings(np.c_[np.ones(n), g], [0, 1])[0] == 70
    # a block effect cannot leak into the null: every relabelling stays within its block
    y = np.c_[np.r_[np.zeros(4), np.full(4, 10.0)]] + rng.normal(0, 0.01, (n, 1))
    res = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], n_perm=5000,
                                 exchangeability_blocks=blocks)
    assert res.exhaustive and res.n_perm == 36
    ok = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], n_perm=20, random_state=0,
                                exchangeability_blocks=blocks, permutations=None)
    assert ok.n_perm == 20


def test_freedman_lane_null_rate_with_a_strong_nuisance(rng):
    """Group and age correlated, data depend on age only: the group test stays at 5 %."""
    n, rejections = 24, 0
    for _ in range(N_NULL):
        age = rng.normal(size=n)
        g = (age + rng.normal(0, 1, n) > 0).astype(float)
        y = 3.0 * age[:, None] + rng.normal(size=(n, 1))
        res = stats.permutation_test(y, np.c_[np.ones(n), g, age], [0, 1, 0], n_perm=100,
                                     random_state=rng)
        rejections += res.p_uncorrected[0, 0] <= 0.05
    assert LOW <= rejections <= HIGH


def test_fwe_rate_of_tfce_and_max_t_on_null_data():
    # a seed of its own: the binomial range holds 95 % of correct runs, so it is pinned
    rng = np.random.default_rng(4)
    shape, n = (10, 10, 10), 12
    mask = np.ones(shape, bool)
    design = np.c_[np.ones(n), np.r_[np.ones(6), np.zeros(6)]]
    rej_t = rej_tfce = 0
    for _ in range(N_NULL):
        res = stats.permutation_test(_smooth(rng, n, shape), design, [0, 1], mask=mask, n_perm=100,
                                     tfce=True, random_state=rng, batch_size=100)
        rej_t += res.p_fwe.min() <= 0.05
        rej_tfce += res.tfce_p_fwe.min() <= 0.05
    assert LOW <= rej_t <= HIGH, rej_t
    assert LOW <= rej_tfce <= HIGH, rej_tfce


def test_planted_effect_recovered_only_where_planted(rng):
    shape, n = (16, 16, 16), 30
    mask = np.ones(shape, bool)
    ijk = np.indices(shape)
    blob = (np.sum((ijk - 5) ** 2, axis=0) <= 9).ravel()
    far = (np.sum((ijk - 5) ** 2, axis=0) >= 49).ravel()
    g = np.r_[np.ones(15), np.zeros(15)]
    y = _smooth(rng, n, shape)
    y[g == 1] += 1.5 * blob
    res = stats.permutation_test(y, np.c_[np.ones(n), g], [[0, 1], [0, -1]], mask=mask, n_perm=200,
                                 tfce=True, random_state=3)
    assert np.mean(res.tfce_p_fwe[0][blob] <= 0.05) > 0.8
    assert np.mean(res.p_fwe[0][blob] <= 0.05) > 0.3
    assert not np.any(res.tfce_p_fwe[0][far] <= 0.05)
    assert not np.any(res.tfce_p_fwe[1] <= 0.05)           # the opposite direction
    assert res.tfce_dh[0] == pytest.approx(res.t[0].max() / 100)


def test_two_sided_uses_absolute_values(rng):
    n = 10
    g = np.r_[np.ones(5), np.zeros(5)]
    y = rng.normal(size=(n, 4)) - 3 * g[:, None]
    one = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], n_perm=5000)
    two = stats.permutation_test(y, np.c_[np.ones(n), g], [0, 1], n_perm=5000, two_sided=True)
    assert np.all(one.p_uncorrected > 0.9) and np.all(two.p_uncorrected < 0.05)


def test_argument_checks(rng):
    y = rng.normal(size=(6, 8))
    x = np.c_[np.ones(6), np.r_[np.ones(3), np.zeros(3)]]
    with pytest.raises(ValueError, match="rows"):
        stats.permutation_test(y, x[:5], [0, 1])
    with pytest.raises(ValueError, match="columns"):
        stats.permutation_test(y, x, [0, 1, 0])
    with pytest.raises(ValueError, match="mask"):
        stats.permutation_test(y, x, [0, 1], tfce=True)
    with pytest.raises(ValueError, match="selects 27"):
        stats.permutation_test(y, x, [0, 1], tfce=True, mask=np.ones((3, 3, 3), bool))
    with pytest.raises(ValueError, match="tfce_steps"):
        stats.permutation_test(y, x, [0, 1], tfce_steps="auto")
    with pytest.raises(ValueError, match="permutation of"):
        stats.permutation_test(y, x, [0, 1], permutations=[[0, 0, 1, 2, 3, 4]])
