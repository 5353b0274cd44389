"""Age-bias ("regression to the mean") correction of brain-age deltas.

Every correction is fitted on controls only and then applied to everyone, so that a
group difference is not absorbed by the fit. Fits serialise to plain dictionaries
(JSON) so a site can reuse another run's coefficients (``--bias-fit-on FILE``).
All methods accept scalar-per-scan data ``(n,)`` or maps ``(n, n_voxels)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validation import _as_float_array, _check_float, _check_in

__all__ = [
    "BIAS_METHODS",
    "LinearBiasCorrection",
    "AgeBinBiasCorrection",
    "fit_bias_correction",
    "bias_correction_from_dict",
    "age_bins",
]

BIAS_METHODS = ("linear-age", "linear-predicted", "extremes", "agebin", "none")


def _line_fit(x, y):
    """Least-squares slope and intercept of y on x, vectorised over y's columns."""
    xc = x - x.mean()
    sxx = np.sum(xc**2)
    if sxx == 0:
        raise ValueError("cannot fit an age-bias line: the fitting ages are all equal.")
    slope = np.tensordot(xc, y - y.mean(axis=0), axes=(0, 0)) / sxx
    return slope, y.mean(axis=0) - slope * x.mean()


@dataclass(frozen=True)
class LinearBiasCorrection:
    """A fitted linear age-bias correction.

    Attributes
    ----------
    method : {'linear-age', 'linear-predicted', 'extremes'}
        ``'linear-age'``: delta = alpha * age + beta (seed 000 eq. 6), corrected
        delta = delta - (alpha * age + beta) (eq. 7, de Lange & Cole 2020).
        ``'linear-predicted'``: delta = alpha * predicted + beta, corrected
        delta = delta - (alpha * predicted + beta) (eq. 8).
        ``'extremes'``: predicted = a * age + b fitted on the youngest and oldest 5 %
        of controls, corrected predicted y' = y + age - (a * age + b) (seed 004), i.e.
        corrected delta = y - (a * age + b).
    slope, intercept : float or numpy.ndarray
        alpha/beta (or a/b); arrays for voxelwise fits.
    n_fit : int
        Number of scans the fit used.
    """

    method: str
    slope: object
    intercept: object
    n_fit: int

    def apply(self, *, age, predicted):
        """Return the corrected brain-age delta (corrected predicted age minus age).

        Parameters
        ----------
        age : array-like, shape (n,)
            Chronological age in years.
        predicted : array-like, shape (n,) or (n, n_voxels)
            Predicted (brain) age, global or per voxel.

        Returns
        -------
        numpy.ndarray
            Corrected delta, same shape as ``predicted``.
        """
        age = _as_float_array(age, "age", ndim=1)
        y = _as_float_array(predicted, "predicted")
        if y.shape[0] != age.size:
            raise ValueError(f"'predicted' must have {age.size} rows; got {y.shape[0]}.")
        x = age.reshape((-1,) + (1,) * (y.ndim - 1))
        delta = y - x
        if self.method == "linear-predicted":
            return delta - (self.slope * y + self.intercept)
        # both 'linear-age' (delta on age) and 'extremes' (y on age) remove a line in age
        return (delta if self.method == "linear-age" else y) - (self.slope * x + self.intercept)

    def to_dict(self):
        """JSON-serialisable description of the fit (scalar fits only)."""
        if np.ndim(self.slope) != 0:
            raise ValueError("only global (scalar) fits serialise to JSON; store maps as images.")
        return {"method": self.method, "slope": float(self.slope),
                "intercept": float(self.intercept), "n_fit": int(self.n_fit)}


def age_bins(max_age, *, first=(18.0, 25.0), width=5.0):
    """Bin edges of the seed 000 voxelwise method: 18–25, then 5-year bins.

    Parameters
    ----------
    max_age : float
        Oldest age that must fall in a bin.
    first : tuple of float, default=(18, 25)
        Edges of the first bin.
    width : float, default=5.0
        Width of every later bin.

    Returns
    -------
    numpy.ndarray
        Increasing edges; bin ``i`` is ``[edges[i], edges[i+1])``.
    """
    max_age = _check_float(max_age, "max_age")
    edges = [float(first[0]), float(first[1])]
    while edges[-1] <= max_age:
        edges.append(edges[-1] + width)
    return np.asarray(edges)


@dataclass(frozen=True)
class AgeBinBiasCorrection:
    """Voxelwise age-bin correction of seed 000 eq. 9.

    ``corrected_delta[j, v] = delta[j, v] - mean_delta[b(j), v]`` where ``b(j)`` is the
    age bin of participant ``j`` and ``mean_delta`` the mean control delta per bin.

    Attributes
    ----------
    edges : tuple of float
        Bin edges (see :func:`age_bins`).
    bin_means : numpy.ndarray, shape (n_bins,) or (n_bins, n_voxels)
        Mean control delta per bin; NaN for bins without controls.
    counts : tuple of int
        Controls per bin.
    """

    edges: tuple
    bin_means: np.ndarray
    counts: tuple
    method: str = "agebin"

    @property
    def n_fit(self):
        """Number of controls that entered the fit."""
        return int(sum(self.counts))

    def bin_index(self, age):
        """Bin of each age (-1 outside the edges)."""
        age = _as_float_array(age, "age", ndim=1)
        idx = np.searchsorted(np.asarray(self.edges), age, side="right") - 1
        idx[(idx < 0) | (idx >= len(self.edges) - 1) | ~np.isfinite(age)] = -1
        return idx

    def apply(self, *, age, predicted):
        """Return the corrected delta; NaN for scans whose bin has no control."""
        age = _as_float_array(age, "age", ndim=1)
        y = _as_float_array(predicted, "predicted")
        if y.shape[0] != age.size:
            raise ValueError(f"'predicted' must have {age.size} rows; got {y.shape[0]}.")
        delta = y - age.reshape((-1,) + (1,) * (y.ndim - 1))
        idx = self.bin_index(age)
        means = np.asarray(self.bin_means, dtype=float)
        padded = np.concatenate([means, np.full((1,) + means.shape[1:], np.nan)])
        return delta - padded[idx]

    def to_dict(self):
        """JSON-serialisable description of the fit (scalar fits only)."""
        means = np.asarray(self.bin_means, dtype=float)
        if means.ndim != 1:
            raise ValueError("only global (scalar) fits serialise to JSON; store maps as images.")
        return {"method": "agebin", "edges": [float(e) for e in self.edges],
                "bin_means": [None if not np.isfinite(m) else float(m) for m in means],
                "counts": [int(c) for c in self.counts], "n_fit": self.n_fit}


def fit_bias_correction(method, *, age, predicted, fraction=0.05):
    """Fit an age-bias correction on controls.

    Parameters
    ----------
    method : {'linear-age', 'linear-predicted', 'extremes', 'agebin'}
        See :class:`LinearBiasCorrection` and :class:`AgeBinBiasCorrection`.
    age : array-like, shape (n,)
        Chronological ages of the controls (years).
    predicted : array-like, shape (n,) or (n, n_voxels)
        Their predicted ages (global or voxelwise).
    fraction : float, default=0.05
        For ``'extremes'``: the youngest and the oldest ``ceil(fraction * n)`` controls
        (at least one each) are used.

    Returns
    -------
    LinearBiasCorrection or AgeBinBiasCorrection
    """
    _check_in(method, BIAS_METHODS[:-1], "method")
    fraction = _check_float(fraction, "fraction", low=0, high=0.5, inclusive=False)
    age = _as_float_array(age, "age", ndim=1, allow_nan=False)
    y = _as_float_array(predicted, "predicted", allow_nan=False)
    if y.shape[0] != age.size:
        raise ValueError(f"'predicted' must have {age.size} rows; got {y.shape[0]}.")
    if age.size < 3:
        raise ValueError(f"a bias fit needs at least 3 controls; got {age.size}.")
    delta = y - age.reshape((-1,) + (1,) * (y.ndim - 1))
    if method == "linear-age":
        slope, icpt = _line_fit(age, delta)
    elif method == "linear-predicted":
        if y.ndim == 1:
            slope, icpt = _line_fit(y, delta)
        else:  # one regression per voxel, predicted age as the regressor
            yc = y - y.mean(axis=0)
            slope = np.sum(yc * (delta - delta.mean(axis=0)), axis=0) / np.sum(yc**2, axis=0)
            icpt = delta.mean(axis=0) - slope * y.mean(axis=0)
    elif method == "extremes":
        k = max(1, int(np.ceil(fraction * age.size)))
        order = np.argsort(age, kind="stable")
        sel = np.concatenate([order[:k], order[-k:]])
        slope, icpt = _line_fit(age[sel], y[sel])
        return LinearBiasCorrection(method, slope, icpt, int(sel.size))
    else:
        edges = age_bins(age.max())
        tmp = AgeBinBiasCorrection(tuple(edges), np.zeros(0), ())
        idx = tmp.bin_index(age)
        n_bins = edges.size - 1
        counts = np.bincount(idx[idx >= 0], minlength=n_bins)
        means = np.full((n_bins,) + delta.shape[1:], np.nan)
        for b in np.flatnonzero(counts):
            means[b] = delta[idx == b].mean(axis=0)
        return AgeBinBiasCorrection(tuple(float(e) for e in edges), means, tuple(int(c) for c in counts))
    return LinearBiasCorrection(method, slope, icpt, int(age.size))


def bias_correction_from_dict(spec):
    """Rebuild a fit written by ``to_dict`` (e.g. a ``*_biasfit.json`` of another run).

    Parameters
    ----------
    spec : dict
        Must hold ``method`` and that method's coefficients.

    Returns
    -------
    LinearBiasCorrection or AgeBinBiasCorrection
    """
    if not isinstance(spec, dict):
        raise TypeError(f"'spec' must be a dict; got {type(spec).__name__}.")
    method = _check_in(spec.get("method"), BIAS_METHODS[:-1], "spec['method']")
    try:
        if method == "agebin":
            means = np.array([np.nan if m is None else m for m in spec["bin_means"]], float)
            return AgeBinBiasCorrection(tuple(float(e) for e in spec["edges"]), means,
                                        tuple(int(c) for c in spec["counts"]))
        return LinearBiasCorrection(method, float(spec["slope"]), float(spec["intercept"]),
                                    int(spec.get("n_fit", 0)))
    except KeyError as exc:
        raise ValueError(f"bias fit for method {method!r} lacks the key {exc}.") from None
