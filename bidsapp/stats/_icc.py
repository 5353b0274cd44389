"""Intraclass correlation for repeated scans (test–retest, between-scanner).

Seed 000 reports ICC(2,1) of Shrout & Fleiss (1979) per voxel and quotes Fisher's
pairwise form (its eq. 4); both are here, vectorised over voxels/ROIs.
"""

from __future__ import annotations

import numpy as np

from ._validation import _as_float_array, _check_in

__all__ = ["ICC_KINDS", "icc", "icc_fisher_pairs"]

ICC_KINDS = ("1,1", "2,1", "3,1", "1,k", "2,k", "3,k")


def _mean_squares(y):
    n, k = y.shape[:2]
    grand = y.mean(axis=(0, 1))
    rows = y.mean(axis=1)
    cols = y.mean(axis=0)
    ss_total = np.sum((y - grand) ** 2, axis=(0, 1))
    ss_rows = k * np.sum((rows - grand) ** 2, axis=0)
    ss_cols = n * np.sum((cols - grand) ** 2, axis=0)
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_err = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    ms_within = (ss_total - ss_rows) / (n * (k - 1))
    return ms_rows, ms_cols, ms_err, ms_within


def icc(ratings, kind="2,1"):
    """Shrout & Fleiss (1979) intraclass correlation coefficients.

    With mean squares for targets (R), raters/sessions (C), residual (E) and within
    targets (W) from a two-way layout:
    ICC(1,1) = (R - W) / (R + (k-1) W); ICC(2,1) = (R - E) / (R + (k-1) E + k (C - E) / n);
    ICC(3,1) = (R - E) / (R + (k-1) E); the "k" forms are the reliabilities of the mean of
    k ratings: (R - W) / R, (R - E) / (R + (C - E) / n), (R - E) / R.
    ICC(2,1) (two-way random, absolute agreement, single measure) is the one seed 000
    uses; pingouin labels it "ICC(A,1)".

    Parameters
    ----------
    ratings : array-like, shape (n_targets, k_raters, ...)
        One row per participant, one column per session/scanner; trailing axes (voxels,
        ROIs) are computed independently. No missing values.
    kind : {'1,1', '2,1', '3,1', '1,k', '2,k', '3,k'}, default='2,1'

    Returns
    -------
    float or numpy.ndarray
        ICC per trailing element (NaN where all ratings are equal).

    Examples
    --------
    >>> y = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    >>> round(float(icc(y, "2,1")), 2)
    0.29
    """
    _check_in(kind, ICC_KINDS, "kind")
    y = _as_float_array(ratings, "ratings", min_ndim=2, allow_nan=False)
    n, k = y.shape[:2]
    if n < 2 or k < 2:
        raise ValueError(f"'ratings' needs at least 2 targets and 2 raters; got shape {y.shape}.")
    r, c, e, w = _mean_squares(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "1,1": (r - w) / (r + (k - 1) * w),
            "2,1": (r - e) / (r + (k - 1) * e + k * (c - e) / n),
            "3,1": (r - e) / (r + (k - 1) * e),
            "1,k": (r - w) / r,
            "2,k": (r - e) / (r + (c - e) / n),
            "3,k": (r - e) / r,
        }[kind]
    return float(out) if np.ndim(out) == 0 else out


def icc_fisher_pairs(x1, x2):
    """Fisher's intraclass correlation for pairs (seed 000 eq. 4).

    ``r = 1/(N s^2) sum_n (x_n1 - m)(x_n2 - m)`` with ``m`` the mean of all 2N values and
    ``s^2 = 1/(2N) [sum (x_n1 - m)^2 + sum (x_n2 - m)^2]``.

    Parameters
    ----------
    x1, x2 : array-like, shape (N, ...)
        First and second measurement of each participant.

    Returns
    -------
    float or numpy.ndarray
    """
    a = _as_float_array(x1, "x1", allow_nan=False)
    b = _as_float_array(x2, "x2", allow_nan=False)
    if a.shape != b.shape:
        raise ValueError(f"'x1' and 'x2' must have the same shape; got {a.shape} and {b.shape}.")
    n = a.shape[0]
    m = (a.sum(axis=0) + b.sum(axis=0)) / (2 * n)
    s2 = (np.sum((a - m) ** 2, axis=0) + np.sum((b - m) ** 2, axis=0)) / (2 * n)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sum((a - m) * (b - m), axis=0) / (n * s2)
    return float(out) if np.ndim(out) == 0 else out
