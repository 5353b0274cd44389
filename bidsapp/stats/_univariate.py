"""Two-group and k-group tests, effect sizes and correlations.

Every function works on plain arrays, along axis 0 (observations); t-tests, effect
sizes and correlations are vectorised over any trailing axes, so the same code
gives a global value, an ROI table or a voxel map.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from ._validation import _as_float_array, _check_float, _check_in, _check_samples

__all__ = [
    "TestResult",
    "welch_ttest",
    "cohens_d",
    "bonferroni",
    "welch_anova",
    "games_howell",
    "ztest_2samp",
    "ks_2samp",
    "pearson",
    "correlate_covariates",
    "sliding_window_correlations",
]

_ALTERNATIVES = ("two-sided", "greater", "less")


@dataclass(frozen=True)
class TestResult:
    """Outcome of one statistical test (scalars, or arrays for vectorised tests).

    Attributes
    ----------
    statistic : float or numpy.ndarray
        Test statistic (t, F, z, D or r).
    pvalue : float or numpy.ndarray
        P-value for the requested alternative.
    df : float, tuple or numpy.ndarray
        Degrees of freedom (NaN where the test has none).
    effect_size : float or numpy.ndarray
        Effect size that goes with the test (Cohen's d, eta squared, r), NaN if none.
    """

    statistic: object
    pvalue: object
    df: object = float("nan")
    effect_size: object = float("nan")


def _pvalue_from_t(t, df, alternative):
    if alternative == "two-sided":
        return 2.0 * stats.t.sf(np.abs(t), df)
    if alternative == "greater":
        return stats.t.sf(t, df)
    return stats.t.cdf(t, df)


def _two_samples(a, b):
    a = _check_samples(_as_float_array(a, "a", allow_nan=False), "a")
    b = _check_samples(_as_float_array(b, "b", allow_nan=False), "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"'a' and 'b' must agree beyond axis 0; got shapes {a.shape} and {b.shape}."
        )
    return a, b


def welch_ttest(a, b, *, alternative="two-sided"):
    """Welch's unequal-variance t-test of mean(a) against mean(b).

    Implements seed 000 eq. 1, ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)``,
    with the Welch–Satterthwaite degrees of freedom of eq. 2
    ``df = (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))``.

    Parameters
    ----------
    a, b : array-like, shape (n_a, ...) and (n_b, ...)
        Observations along axis 0; trailing axes (ROIs, voxels) are tested independently.
    alternative : {'two-sided', 'greater', 'less'}, default='two-sided'
        'greater' tests mean(a) > mean(b).

    Returns
    -------
    TestResult
        ``statistic`` (t), ``pvalue``, ``df`` (Welch–Satterthwaite) and ``effect_size``
        (Cohen's d with pooled SD, eq. 3). Constant columns give NaN.

    Examples
    --------
    >>> res = welch_ttest([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0])
    >>> round(float(res.statistic), 4), round(float(res.df), 4)
    (-2.2514, 5.5208)
    """
    _check_in(alternative, _ALTERNATIVES, "alternative")
    a, b = _two_samples(a, b)
    na, nb = a.shape[0], b.shape[0]
    va = a.var(axis=0, ddof=1) / na
    vb = b.var(axis=0, ddof=1) / nb
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a.mean(axis=0) - b.mean(axis=0)) / np.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
        p = _pvalue_from_t(t, df, alternative)
    return TestResult(t, p, df, cohens_d(a, b))


def cohens_d(a, b):
    """Cohen's d with the pooled standard deviation (seed 000 eq. 3).

    ``d = (m_a - m_b) / sqrt(((n_a-1) var_a + (n_b-1) var_b) / (n_a + n_b - 2))``; positive
    when ``a`` has the larger mean.

    Parameters
    ----------
    a, b : array-like, shape (n_a, ...) and (n_b, ...)
        Observations along axis 0.

    Returns
    -------
    float or numpy.ndarray
        Effect size per trailing element (NaN where both groups are constant).
    """
    a, b = _two_samples(a, b)
    na, nb = a.shape[0], b.shape[0]
    pooled = ((na - 1) * a.var(axis=0, ddof=1) + (nb - 1) * b.var(axis=0, ddof=1)) / (na + nb - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a.mean(axis=0) - b.mean(axis=0)) / np.sqrt(pooled)


def bonferroni(pvalues, n_tests=None):
    """Bonferroni-corrected p-values, ``min(1, p * m)``.

    Parameters
    ----------
    pvalues : array-like
        Uncorrected p-values; NaN entries stay NaN and are not counted.
    n_tests : int, optional
        Number of tests ``m``; defaults to the number of finite p-values.

    Returns
    -------
    numpy.ndarray
        Corrected p-values, same shape as ``pvalues``.
    """
    p = _as_float_array(pvalues, "pvalues", min_ndim=0)
    m = int(np.isfinite(p).sum()) if n_tests is None else n_tests
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"'n_tests' must be a positive integer; got {n_tests!r}.")
    return np.minimum(1.0, p * m)


def _groups(values, groups, min_groups):
    y = _as_float_array(values, "values", ndim=1, allow_nan=False)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"'groups' must have shape {y.shape}; got {g.shape}.")
    labels = list(pd.unique(g))
    if len(labels) < min_groups:
        raise ValueError(f"'groups' must hold at least {min_groups} labels; got {labels}.")
    samples = [y[g == lab] for lab in labels]
    for lab, s in zip(labels, samples):
        _check_samples(s, f"group {lab!r}")
    return labels, samples


def welch_anova(values, groups):
    """Welch's heteroscedastic one-way ANOVA (seed 004, via pingouin in the paper).

    With weights ``w_i = n_i / s_i^2``, ``F = [sum w_i (m_i - m_w)^2 / (k-1)] /
    [1 + 2 (k-2)/(k^2-1) * L]``, ``L = sum (1 - w_i/W)^2 / (n_i - 1)``,
    ``df1 = k - 1`` and ``df2 = (k^2 - 1) / (3 L)``.

    Parameters
    ----------
    values : array-like, shape (n,)
        Dependent variable (e.g. brain-PAD).
    groups : array-like, shape (n,)
        Group label of each value (at least two labels, two values each).

    Returns
    -------
    TestResult
        ``statistic`` F, ``df`` = (df1, df2), ``pvalue`` and ``effect_size`` (eta squared,
        between-group over total sum of squares).
    """
    _, samples = _groups(values, groups, 2)
    k = len(samples)
    n = np.array([s.size for s in samples], dtype=float)
    m = np.array([s.mean() for s in samples])
    v = np.array([s.var(ddof=1) for s in samples])
    w = n / v
    mw = np.sum(w * m) / w.sum()
    lam = np.sum((1.0 - w / w.sum()) ** 2 / (n - 1.0))
    f = (np.sum(w * (m - mw) ** 2) / (k - 1)) / (1.0 + 2.0 * (k - 2) / (k**2 - 1) * lam)
    df2 = (k**2 - 1) / (3.0 * lam)
    allv = np.concatenate(samples)
    eta2 = np.sum(n * (m - allv.mean()) ** 2) / np.sum((allv - allv.mean()) ** 2)
    return TestResult(float(f), float(stats.f.sf(f, k - 1, df2)), (k - 1, float(df2)), float(eta2))


def games_howell(values, groups):
    """Games–Howell pairwise post-hoc comparisons (seed 004).

    For each pair, ``T = (m_A - m_B) / sqrt(v_A/n_A + v_B/n_B)`` with Welch df and
    ``p = P(Q_{k,df} > sqrt(2) |T|)`` from the studentized range distribution.

    Parameters
    ----------
    values, groups : array-like, shape (n,)
        As in :func:`welch_anova`; pairs follow the order of first appearance.

    Returns
    -------
    pandas.DataFrame
        Columns ``A, B, mean_A, mean_B, diff, se, T, df, pval, cohen_d``.
    """
    labels, samples = _groups(values, groups, 2)
    k = len(labels)
    rows = []
    for (i, la), (j, lb) in combinations(enumerate(labels), 2):
        a, b = samples[i], samples[j]
        res = welch_ttest(a, b)
        se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
        p = stats.studentized_range.sf(np.sqrt(2.0) * abs(float(res.statistic)), k, float(res.df))
        rows.append(
            {"A": la, "B": lb, "mean_A": a.mean(), "mean_B": b.mean(),
             "diff": a.mean() - b.mean(), "se": se, "T": float(res.statistic),
             "df": float(res.df), "pval": float(np.clip(p, 0.0, 1.0)),
             "cohen_d": float(res.effect_size)}
        )
    return pd.DataFrame(rows)


def ztest_2samp(a, b, *, value=0.0, usevar="pooled", alternative="two-sided"):
    """Two-sample Z-test of the mean difference (seed 004; statsmodels ``ztest``).

    ``z = (mean_a - mean_b - value) / se`` with ``se = sqrt(s_p^2 (1/n_a + 1/n_b))`` for
    ``usevar='pooled'`` (``s_p^2`` the pooled unbiased variance) or
    ``sqrt(s_a^2/n_a + s_b^2/n_b)`` for ``'unequal'``; p from the standard normal.

    Parameters
    ----------
    a, b : array-like, shape (n_a,) and (n_b,)
        The two samples.
    value : float, default=0.0
        Mean difference under the null hypothesis.
    usevar : {'pooled', 'unequal'}, default='pooled'
        Variance estimate, as in statsmodels.
    alternative : {'two-sided', 'greater', 'less'}, default='two-sided'

    Returns
    -------
    TestResult
        ``statistic`` z, ``pvalue`` and ``effect_size`` (Cohen's d).
    """
    _check_in(usevar, ("pooled", "unequal"), "usevar")
    _check_in(alternative, _ALTERNATIVES, "alternative")
    value = _check_float(value, "value")
    a, b = _two_samples(a, b)
    if a.ndim != 1:
        raise ValueError(f"'a' and 'b' must be 1D; got shape {a.shape}.")
    na, nb = a.size, b.size
    if usevar == "pooled":
        sp2 = (np.sum((a - a.mean()) ** 2) + np.sum((b - b.mean()) ** 2)) / (na + nb - 2)
        se = np.sqrt(sp2 * (1.0 / na + 1.0 / nb))
    else:
        se = np.sqrt(a.var(ddof=1) / na + b.var(ddof=1) / nb)
    z = (a.mean() - b.mean() - value) / se
    if alternative == "two-sided":
        p = 2.0 * stats.norm.sf(abs(z))
    elif alternative == "greater":
        p = stats.norm.sf(z)
    else:
        p = stats.norm.cdf(z)
    return TestResult(float(z), float(p), float("nan"), float(cohens_d(a, b)))


def ks_2samp(a, b, *, alternative="two-sided"):
    """Two-sample Kolmogorov–Smirnov test between PAD distributions (seed 001).

    ``D = sup_x |F_a(x) - F_b(x)|``; the p-value is scipy's (exact for small samples,
    asymptotic otherwise), which the seed used.

    Parameters
    ----------
    a, b : array-like, shape (n_a,) and (n_b,)
        The two samples (e.g. PADs of two models, or of two groups).
    alternative : {'two-sided', 'greater', 'less'}, default='two-sided'

    Returns
    -------
    TestResult
        ``statistic`` D and ``pvalue``.
    """
    _check_in(alternative, _ALTERNATIVES, "alternative")
    a, b = _two_samples(a, b)
    if a.ndim != 1:
        raise ValueError(f"'a' and 'b' must be 1D; got shape {a.shape}.")
    res = stats.ks_2samp(a, b, alternative=alternative)
    return TestResult(float(res.statistic), float(res.pvalue))


def pearson(x, y, *, alternative="two-sided"):
    """Pearson correlation along axis 0, vectorised over trailing axes.

    ``r = sum(xc yc) / sqrt(sum xc^2 sum yc^2)``; the p-value uses
    ``t = r sqrt((n-2)/(1-r^2))`` with n - 2 degrees of freedom.

    Parameters
    ----------
    x, y : array-like, shape (n, ...)
        Paired observations; shapes must broadcast beyond axis 0. Rows with NaN are
        dropped when both inputs are 1D (pairwise complete), refused otherwise.
    alternative : {'two-sided', 'greater', 'less'}, default='two-sided'

    Returns
    -------
    TestResult
        ``statistic`` r, ``pvalue``, ``df`` = n - 2 and ``effect_size`` r.
    """
    _check_in(alternative, _ALTERNATIVES, "alternative")
    x = _as_float_array(x, "x")
    y = _as_float_array(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"'x' and 'y' need the same number of rows; got {x.shape[0]} and {y.shape[0]}.")
    if x.ndim == 1 and y.ndim == 1:
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
    elif not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("'x' and 'y' must be finite when either is more than 1D.")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"pearson needs at least 3 complete pairs; got {n}.")
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    # normalise before multiplying so that large values do not overflow
    xc = xc / np.sqrt(np.sum(xc**2, axis=0))
    yc = yc / np.sqrt(np.sum(yc**2, axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(np.sum(xc * yc, axis=0), -1.0, 1.0)
        t = r * np.sqrt((n - 2) / (1.0 - r**2))
        p = _pvalue_from_t(t, n - 2, alternative)
    if np.ndim(r) == 0:
        r, p = float(r), float(p)
    return TestResult(r, p, n - 2, r)


def correlate_covariates(values, covariates):
    """Pearson correlation of one variable (e.g. brain-PAD) with each covariate.

    Seed 001 correlates brain-PAD with survival; seed 002 with biomarkers. Rows with
    a missing value are dropped per covariate; p-values are Bonferroni-corrected over
    the covariates tested.

    Parameters
    ----------
    values : array-like, shape (n,)
        The variable to correlate.
    covariates : pandas.DataFrame
        Numeric columns, ``n`` rows (non-numeric columns are skipped).

    Returns
    -------
    pandas.DataFrame
        Columns ``variable, n, r, p, p_bonferroni``.
    """
    v = _as_float_array(values, "values", ndim=1)
    if not isinstance(covariates, pd.DataFrame):
        raise TypeError(f"'covariates' must be a pandas DataFrame; got {type(covariates).__name__}.")
    if len(covariates) != v.size:
        raise ValueError(f"'covariates' must have {v.size} rows; got {len(covariates)}.")
    rows = []
    for name in covariates.columns:
        col = pd.to_numeric(covariates[name], errors="coerce").to_numpy(float)
        keep = np.isfinite(col) & np.isfinite(v)
        if keep.sum() < 3 or np.ptp(col[keep]) == 0 or np.ptp(v[keep]) == 0:
            continue
        res = pearson(v[keep], col[keep])
        rows.append({"variable": name, "n": int(keep.sum()), "r": res.statistic, "p": res.pvalue})
    out = pd.DataFrame(rows, columns=["variable", "n", "r", "p"])
    out["p_bonferroni"] = bonferroni(out["p"].to_numpy()) if len(out) else []
    return out


def sliding_window_correlations(age, values, covariates, *, width=10.0, step=5.0, min_n=5):
    """Correlations in overlapping sliding age windows (seed 002, Fig. 7).

    Windows are ``[s, s + width)`` for ``s = floor(min age) + j * step`` until a window
    reaches the oldest participant (the last window also includes its upper edge).
    Within each window, Pearson r of ``values`` with every covariate; p-values are
    Bonferroni-corrected over the covariates of that window ("per bin" in the seed).

    Parameters
    ----------
    age : array-like, shape (n,)
        Chronological age in years.
    values : array-like, shape (n,)
        E.g. brain-PAD.
    covariates : pandas.DataFrame
        Numeric covariates, ``n`` rows.
    width : float, default=10.0
        Window width in years.
    step : float, default=5.0
        Distance between window starts in years.
    min_n : int, default=5
        Windows/covariates with fewer complete pairs are skipped.

    Returns
    -------
    pandas.DataFrame
        Columns ``window_start, window_end, variable, n, r, p, p_bonferroni``.
    """
    age = _as_float_array(age, "age", ndim=1)
    width = _check_float(width, "width", low=0, inclusive=False)
    step = _check_float(step, "step", low=0, inclusive=False)
    if isinstance(min_n, bool) or not isinstance(min_n, (int, np.integer)) or min_n < 3:
        raise ValueError(f"'min_n' must be an integer >= 3; got {min_n!r}.")
    v = _as_float_array(values, "values", ndim=1)
    if v.size != age.size:
        raise ValueError(f"'values' must have {age.size} entries; got {v.size}.")
    if not isinstance(covariates, pd.DataFrame) or len(covariates) != age.size:
        raise ValueError(f"'covariates' must be a DataFrame with {age.size} rows.")
    finite = np.isfinite(age)
    if not finite.any():
        raise ValueError("'age' has no finite value.")
    lo, hi = np.floor(age[finite].min()), age[finite].max()
    n_win = max(1, int(np.ceil((hi - lo - width) / step - 1e-9)) + 1)
    frames = []
    for j in range(n_win):
        start = lo + j * step
        end = start + width
        last = j == n_win - 1
        inside = finite & (age >= start) & ((age <= end) if last else (age < end))
        sub = covariates.loc[inside]
        keep_cols = [c for c in sub.columns
                     if (np.isfinite(pd.to_numeric(sub[c], errors="coerce").to_numpy(float))
                         & np.isfinite(v[inside])).sum() >= min_n]
        if not keep_cols:
            continue
        res = correlate_covariates(v[inside], sub[keep_cols])
        if res.empty:
            continue
        res.insert(0, "window_end", end)
        res.insert(0, "window_start", start)
        frames.append(res)
    cols = ["window_start", "window_end", "variable", "n", "r", "p", "p_bonferroni"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
