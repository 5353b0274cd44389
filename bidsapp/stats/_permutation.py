"""Permutation inference for the GLM, equivalent to FSL randomise.

* Design partitioned per contrast into effect of interest X and nuisance Z (Smith et
  al.; Winkler et al. 2014, appendix); Freedman–Lane: residuals of the nuisance-only
  model are permuted (or sign-flipped) and the full model is refitted.
* One-sample designs (no varying effect of interest) use sign flipping; otherwise
  rows are permuted, within exchangeability blocks if given.
* The unpermuted labelling is the first of the ``n_perm`` relabellings and counts in
  the null distribution, so ``p = #{null >= observed} / n_perm`` (never 0); when there
  are no more distinct relabellings than ``n_perm`` they are all enumerated.
* Voxelwise t and TFCE (steps fixed from the unpermuted map, or nilearn's per-map rule),
  max-statistic FWE-corrected and uncorrected p-values; one-sided in the contrast
  direction (randomise), or two-sided on |t| (nilearn's default) on request.

For a permutation with data rows ``E[idx]`` the t statistic needs only ``a' E[idx]`` and
``||Q' E[idx]||^2`` (``a`` the contrast row of the pseudo-inverse, ``Q`` an orthonormal
basis of the design), so a batch of relabellings is one matrix product with ``E``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import combinations, product
from math import factorial, prod

import numpy as np
from scipy import linalg

from ._tfce import _tfce_batch, _VoxelGraph, tfce_thresholds
from ._validation import (_as_float_array, _check_float, _check_in, _check_int, _check_mask)

__all__ = ["PermutationResult", "permutation_test", "count_relabellings"]

LOGGER = logging.getLogger("brainage.stats")
_REL_TOL = 1e-10  # ties within rounding count as "as extreme"


@dataclass(frozen=True)
class PermutationResult:
    """Output of :func:`permutation_test`; arrays have one row per contrast.

    Attributes
    ----------
    t : numpy.ndarray, shape (n_contrasts, n_voxels)
        Unpermuted GLM t statistic (randomise ``tstat``).
    p_uncorrected, p_fwe : numpy.ndarray, shape (n_contrasts, n_voxels)
        Voxelwise permutation p-values of t, uncorrected and max-t FWE-corrected.
    tfce, tfce_p_uncorrected, tfce_p_fwe : numpy.ndarray or None
        TFCE of the unpermuted t map and its p-values (None without TFCE).
    null_max_t, null_max_tfce : numpy.ndarray, shape (n_contrasts, n_perm)
        Max-statistic null distributions (first column: unpermuted).
    n_perm : int
        Relabellings used, the unpermuted one included.
    exhaustive : bool
        Whether every distinct relabelling was enumerated.
    scheme : {'permutation', 'sign-flip'}
    dof : int
        Residual degrees of freedom of the GLM.
    tfce_dh : tuple of float or None
        Fixed TFCE step per contrast (randomise rule) or None for per-map steps.
    """

    t: np.ndarray
    p_uncorrected: np.ndarray
    p_fwe: np.ndarray
    tfce: np.ndarray | None
    tfce_p_uncorrected: np.ndarray | None
    tfce_p_fwe: np.ndarray | None
    null_max_t: np.ndarray
    null_max_tfce: np.ndarray | None
    n_perm: int
    exhaustive: bool
    scheme: str
    dof: int
    tfce_dh: tuple | None


def _orth(m, tol=1e-10):
    """Orthonormal basis of the column space of ``m`` (possibly empty)."""
    if m.size == 0:
        return np.zeros((m.shape[0], 0))
    u, s, _ = linalg.svd(m, full_matrices=False)
    return u[:, s > tol * max(1.0, s[0])]


def _partition(design, contrast):
    """Split ``design`` into effect of interest X (n, 1) and nuisance Z for ``contrast``."""
    c = contrast[:, None]
    x = design @ c / float(c.T @ c)
    z = design @ linalg.null_space(c.T)
    return x, _orth(z)


def _labels(x):
    """Integer label of each row's effect-of-interest value (randomise's design labels)."""
    _, lab = np.unique(np.round(x.ravel(), 10), return_inverse=True)
    return lab


def count_relabellings(design, contrast, *, exchangeability_blocks=None):
    """Number of distinct relabellings of a design for one contrast.

    Sign flipping (one-sample designs): ``2^n``; permutation: the product over
    exchangeability blocks of the multinomial ``n_b! / prod_l n_{b,l}!`` over the distinct
    effect-of-interest values ``l``.

    Parameters
    ----------
    design : array-like, shape (n, p)
    contrast : array-like, shape (p,)
    exchangeability_blocks : array-like, shape (n,), optional

    Returns
    -------
    tuple of (int, str)
        Count and scheme (``'sign-flip'`` or ``'permutation'``).
    """
    design = _as_float_array(design, "design", ndim=2, allow_nan=False)
    c = _as_float_array(contrast, "contrast", ndim=1, allow_nan=False)
    blocks = _blocks(exchangeability_blocks, design.shape[0])
    x, _ = _partition(design, c)
    lab = _labels(x)
    if lab.max() == 0:
        return 2 ** design.shape[0], "sign-flip"
    total = 1
    for b in np.unique(blocks):
        counts = np.bincount(lab[blocks == b])
        total *= factorial(int(counts.sum())) // prod(factorial(int(k)) for k in counts)
    return total, "permutation"


def _blocks(blocks, n):
    if blocks is None:
        return np.zeros(n, dtype=np.int64)
    b = np.asarray(blocks)
    if b.shape != (n,):
        raise ValueError(f"'exchangeability_blocks' must have shape ({n},); got {b.shape}.")
    return np.unique(b, return_inverse=True)[1]


def _enumerate_permutations(lab, blocks):
    """All distinct label arrangements within blocks, as data-row index arrays."""
    n = lab.size
    per_block = []
    for b in np.unique(blocks):
        rows = np.flatnonzero(blocks == b)
        values = lab[rows]
        arrangements = []
        for arr in _multiset_arrangements(values):
            idx = np.empty(rows.size, dtype=np.int64)
            # row i (label L_i) takes the datum of a row j whose new label is L_i
            for v in np.unique(values):
                idx[values == v] = rows[arr == v]
            arrangements.append(idx)
        per_block.append((rows, arrangements))
    out = []
    for combo in product(*(a for _, a in per_block)):
        idx = np.arange(n)
        for (rows, _), sub in zip(per_block, combo):
            idx[rows] = sub
        out.append(idx)
    out = np.array(out)
    ident = np.flatnonzero((out == np.arange(n)).all(axis=1))[0]
    out[[0, ident]] = out[[ident, 0]]
    return out


def _multiset_arrangements(values):
    """Distinct orderings of ``values`` (a multiset), via nested position choices."""
    uniq, counts = np.unique(values, return_counts=True)
    n = values.size

    def rec(free, k):
        if k == len(uniq) - 1:
            arr = np.empty(n, dtype=values.dtype)
            arr[list(free)] = uniq[k]
            yield arr
            return
        for chosen in combinations(free, int(counts[k])):
            rest = tuple(i for i in free if i not in set(chosen))
            for arr in rec(rest, k + 1):
                arr[list(chosen)] = uniq[k]
                yield arr

    yield from rec(tuple(range(n)), 0)


def _random_permutations(rng, n_draw, blocks):
    """Random within-block row permutations (one per row of the output)."""
    n = blocks.size
    grouped = np.argsort(blocks, kind="stable")
    keys = blocks[None, :].astype(float) + rng.random((n_draw, n))
    out = np.empty((n_draw, n), dtype=np.int64)
    out[:, grouped] = np.argsort(keys, axis=1)
    return out


@dataclass
class _Model:
    """Per-contrast quantities of the Freedman–Lane refit."""

    resid: np.ndarray        # E = R_z Y, (n, V)
    resid_ss: np.ndarray     # ||E||^2 per voxel
    a: np.ndarray            # contrast row of pinv(W), (n,)
    q: np.ndarray            # orthonormal basis of W, (n, r)
    var_factor: float        # (W'W)^-1 for the effect of interest
    dof: int


def _fit_model(data, design, contrast):
    x, z = _partition(design, contrast)
    w = np.hstack([x, z])
    q = _orth(w)
    dof = data.shape[0] - q.shape[1]
    if dof < 1:
        raise ValueError(f"the design leaves no residual degrees of freedom (n={data.shape[0]}).")
    resid = data - z @ (z.T @ data) if z.shape[1] else data.copy()
    pinv = linalg.pinv(w)
    return _Model(resid, np.sum(resid**2, axis=0), pinv[0], q, float(pinv[0] @ pinv[0]), dof)


def _t_batch(model, perms, flip):
    """t maps (B, V) for a batch of relabellings (index arrays or sign vectors)."""
    n_b, n = perms.shape
    r = model.q.shape[1]
    if flip:
        weights = np.concatenate([perms * model.a, (perms[:, :, None] * model.q).transpose(0, 2, 1)
                                  .reshape(n_b * r, n)])
    else:
        rows = np.arange(n_b)[:, None]
        ap = np.empty((n_b, n))
        ap[rows, perms] = model.a
        qp = np.empty((n_b, n, r))
        qp[rows, perms] = model.q
        weights = np.concatenate([ap, qp.transpose(0, 2, 1).reshape(n_b * r, n)])
    g = weights @ model.resid
    num = g[:n_b]
    proj = np.sum(g[n_b:].reshape(n_b, r, -1) ** 2, axis=1)
    rss = np.maximum(model.resid_ss - proj, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / np.sqrt(model.var_factor * rss / model.dof)
    # constant voxels (no residual variance) carry no evidence
    t[~(rss > 1e-12 * np.maximum(model.resid_ss, 1e-300))] = 0.0
    return t


def _ge(a, b):
    """``a >= b`` up to rounding (ties count as "as extreme")."""
    return a >= b - _REL_TOL * (np.abs(b) + 1.0)


def permutation_test(data, design, contrasts, *, mask=None, n_perm=5000, tfce=False,
                     tfce_steps="fixed", connectivity=6, E=0.5, H=2.0, two_sided=False,
                     exchangeability_blocks=None, permutations=None, random_state=0,
                     batch_size=32, n_jobs=1, progress=False):
    """Nonparametric GLM inference with max-statistic FWE control (FSL randomise).

    Parameters
    ----------
    data : array-like, shape (n_samples, n_voxels)
        One row per scan (masked map, ROI values, or a single column).
    design : array-like, shape (n_samples, n_regressors)
        Full design matrix, intercept included where wanted.
    contrasts : array-like, shape (n_regressors,) or (n_contrasts, n_regressors)
        t contrasts; each is tested in its positive direction (randomise), or on |t|
        when ``two_sided``.
    mask : numpy.ndarray of bool, shape (X, Y, Z), optional
        Required for TFCE: ``data`` columns are the mask's voxels in C order.
    n_perm : int, default=5000
        Relabellings including the unpermuted one; all distinct ones are enumerated
        when there are at most ``n_perm``.
    tfce : bool, default=False
        Also compute TFCE and its p-values.
    tfce_steps : {'fixed', 'per-map'}, default='fixed'
        'fixed': step ``dh = max(unpermuted stat)/100`` reused for every relabelling
        (randomise ``-T``); 'per-map': 100 steps from each map's own maximum (nilearn).
    connectivity : {6, 18, 26}, default=6
    E, H : float, default=0.5, 2.0
        TFCE extent and height exponents.
    two_sided : bool, default=False
        Test |t| (and |TFCE| of both signs, shared steps from max |t|) as nilearn's
        ``two_sided_test=True``.
    exchangeability_blocks : array-like, shape (n_samples,), optional
        Rows are only permuted within their block.
    permutations : array-like, shape (n_draws, n_samples), optional
        Explicit relabellings to use after the unpermuted one: row-index arrays
        (``data[idx]``), or ±1 sign vectors for sign flipping. Overrides ``n_perm``.
    random_state : int or numpy.random.Generator, default=0
    batch_size : int, default=32
        Relabellings per matrix product.
    n_jobs : int, default=1
        Worker processes (joblib) for the relabellings.
    progress : bool, default=False
        Show a tqdm progress bar.

    Returns
    -------
    PermutationResult
    """
    y = _as_float_array(data, "data", ndim=2, allow_nan=False)
    x = _as_float_array(design, "design", ndim=2, allow_nan=False)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"'design' must have {y.shape[0]} rows; got {x.shape[0]}.")
    cons = np.atleast_2d(_as_float_array(contrasts, "contrasts", allow_nan=False))
    if cons.shape[1] != x.shape[1] or cons.ndim != 2:
        raise ValueError(f"'contrasts' must have {x.shape[1]} columns; got shape {cons.shape}.")
    if np.any(np.all(cons == 0, axis=1)):
        raise ValueError("'contrasts' has an all-zero row.")
    n_perm = _check_int(n_perm, "n_perm", minimum=1)
    _check_in(tfce_steps, ("fixed", "per-map"), "tfce_steps")
    E = _check_float(E, "E", low=0)
    H = _check_float(H, "H", low=0)
    batch_size = _check_int(batch_size, "batch_size", minimum=1)
    n_jobs = _check_int(n_jobs, "n_jobs", minimum=1)
    graph = None
    if tfce:
        if mask is None:
            raise ValueError("'mask' is required when 'tfce' is True.")
        mask = _check_mask(mask)
        if mask.sum() != y.shape[1]:
            raise ValueError(f"'mask' selects {mask.sum()} voxels but 'data' has {y.shape[1]} columns.")
        graph = _VoxelGraph(mask, connectivity)
    blocks = _blocks(exchangeability_blocks, y.shape[0])
    rng = random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(random_state)

    plans = [_relabellings(x, c, blocks, n_perm, permutations, rng) for c in cons]
    if len({(p[0].shape[0], p[1]) for p in plans}) > 1:
        raise ValueError("the contrasts need different relabelling schemes (sign flipping vs "
                         "permutation, or different counts); test them in separate calls.")
    outputs = []
    for c, (relab, flip, exhaustive) in zip(cons, plans):
        model = _fit_model(y, x, c)
        outputs.append(_run_contrast(model, relab, flip, graph, tfce_steps, E, H, two_sided,
                                     batch_size, n_jobs, progress) + (exhaustive, flip, model.dof))
    stack = lambda i: None if outputs[0][i] is None else np.stack([o[i] for o in outputs])  # noqa: E731
    dh = tuple(o[7] for o in outputs) if tfce and tfce_steps == "fixed" else None
    return PermutationResult(
        t=stack(0), p_uncorrected=stack(1), p_fwe=stack(2), tfce=stack(3),
        tfce_p_uncorrected=stack(4), tfce_p_fwe=stack(5), null_max_t=stack(6),
        null_max_tfce=stack(8), n_perm=int(outputs[0][6].size),
        exhaustive=bool(outputs[0][9]), scheme="sign-flip" if outputs[0][10] else "permutation",
        dof=int(outputs[0][11]), tfce_dh=dh)


def _relabellings(design, contrast, blocks, n_perm, explicit, rng):
    """Relabellings for one contrast: (array, is_flip, exhaustive), unpermuted first."""
    n = design.shape[0]
    x, _ = _partition(design, contrast)
    lab = _labels(x)
    flip = lab.max() == 0
    if explicit is not None:
        ex = np.asarray(explicit)
        if ex.ndim != 2 or ex.shape[1] != n:
            raise ValueError(f"'permutations' must have shape (n_draws, {n}); got {ex.shape}.")
        if flip:
            if not np.all(np.isin(ex, (-1, 1))):
                raise ValueError("'permutations' must hold ±1 sign vectors for a one-sample design.")
            first = np.ones((1, n))
        else:
            if not np.all(np.sort(ex, axis=1) == np.arange(n)):
                raise ValueError("each row of 'permutations' must be a permutation of 0..n-1.")
            first = np.arange(n)[None]
        return np.concatenate([first, ex]).astype(float if flip else np.int64), flip, False
    if flip:
        if 2**n <= n_perm:
            signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
            return signs, True, True
        draws = 1.0 - 2.0 * rng.integers(0, 2, size=(n_perm - 1, n))
        return np.concatenate([np.ones((1, n)), draws]), True, False
    total, _ = count_relabellings(design, contrast, exchangeability_blocks=blocks)
    if total <= n_perm:
        return _enumerate_permutations(lab, blocks), False, True
    draws = _random_permutations(rng, n_perm - 1, blocks)
    return np.concatenate([np.arange(n)[None], draws]), False, False


# voxels per TFCE call: small maps are stacked so the per-level overhead is shared,
# large ones go one at a time (stacking them only adds cache misses)
_TFCE_VOXELS_PER_CALL = 100_000


def _tfce_maps(stats_, graph, dh, E, H, two_sided):
    """TFCE of a batch of t maps (rows), following the sign convention.

    Two-sided: both signs with shared steps from max |t| (nilearn), summed (they never
    overlap), i.e. |TFCE|.
    """
    n_maps, n_vox = stats_.shape
    if two_sided:
        maps = np.concatenate([stats_, -stats_])
        tops = np.tile(np.max(np.abs(stats_), axis=1), 2)
    else:
        maps, tops = stats_, np.max(stats_, axis=1)
    ths = [tfce_thresholds(m, dh) for m in tops]
    step = max(1, _TFCE_VOXELS_PER_CALL // n_vox)
    out = np.concatenate([_tfce_batch(maps[s:s + step], graph, ths[s:s + step], E, H)
                          for s in range(0, maps.shape[0], step)])
    return out[:n_maps] + out[n_maps:] if two_sided else out


def _run_chunk(model, relab, flip, graph, dh, E, H, two_sided, obs_t, obs_tf, batch_size):
    """Null maxima and exceedance counts for a chunk of relabellings."""
    n_vox = model.resid.shape[1]
    max_t = np.empty(relab.shape[0])
    max_tf = np.empty(relab.shape[0]) if graph is not None else None
    cnt_t = np.zeros(n_vox, dtype=np.int64)
    cnt_tf = np.zeros(n_vox, dtype=np.int64) if graph is not None else None
    for s in range(0, relab.shape[0], batch_size):
        t = _t_batch(model, relab[s:s + batch_size], flip)
        stat = np.abs(t) if two_sided else t
        max_t[s:s + t.shape[0]] = stat.max(axis=1)
        cnt_t += np.sum(_ge(stat, obs_t), axis=0)
        if graph is not None:
            tf = _tfce_maps(t, graph, dh, E, H, two_sided)
            max_tf[s:s + t.shape[0]] = tf.max(axis=1)
            cnt_tf += np.sum(_ge(tf, obs_tf), axis=0)
    return max_t, max_tf, cnt_t, cnt_tf


def _run_contrast(model, relab, flip, graph, tfce_steps, E, H, two_sided, batch_size, n_jobs,
                  progress):
    t_obs = _t_batch(model, relab[:1], flip)[0]
    obs_t = np.abs(t_obs) if two_sided else t_obs
    dh, obs_tf = None, None
    if graph is not None:
        top = obs_t.max()
        if top > 0:
            dh = top / 100.0 if tfce_steps == "fixed" else None
            obs_tf = _tfce_maps(t_obs[None], graph, dh, E, H, two_sided)[0]
        else:
            LOGGER.warning("no positive statistic in the unpermuted map: TFCE is 0 everywhere.")
            obs_tf = np.zeros_like(t_obs)
    # with an all-zero unpermuted TFCE map every relabelling is as extreme: skip the work
    run_graph = graph if graph is not None and obs_tf.max() > 0 else None
    rest = relab[1:]
    if n_jobs > 1 and rest.shape[0] > batch_size:
        from joblib import Parallel, delayed

        size = int(np.ceil(rest.shape[0] / n_jobs))
        res = Parallel(n_jobs=n_jobs)(
            delayed(_run_chunk)(model, rest[s:s + size], flip, run_graph, dh, E, H, two_sided,
                                obs_t, obs_tf, batch_size)
            for s in range(0, rest.shape[0], size))
    else:
        starts = range(0, rest.shape[0], 4 * batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="permutations", unit="chunk")
        res = [_run_chunk(model, rest[s:s + 4 * batch_size], flip, run_graph, dh, E, H,
                          two_sided, obs_t, obs_tf, batch_size) for s in starts]
    n = relab.shape[0]
    # the unpermuted labelling is part of the null: it ties with itself everywhere
    max_t = np.concatenate([[obs_t.max()]] + [r[0] for r in res])
    p_unc = (1 + sum((r[2] for r in res), np.zeros(obs_t.size, dtype=np.int64))) / n
    p_fwe = _fwe(max_t, obs_t)
    tf = tf_unc = tf_fwe = max_tf = None
    if graph is not None:
        tf = obs_tf * np.sign(t_obs) if two_sided else obs_tf
        if run_graph is None:
            max_tf = np.zeros(n)
            tf_unc = np.ones_like(t_obs)
            tf_fwe = np.ones_like(t_obs)
        else:
            max_tf = np.concatenate([[obs_tf.max()]] + [r[1] for r in res])
            tf_unc = (1 + sum((r[3] for r in res), np.zeros(obs_t.size, dtype=np.int64))) / n
            tf_fwe = _fwe(max_tf, obs_tf)
    return t_obs, p_unc, p_fwe, tf, tf_unc, tf_fwe, max_t, dh, max_tf


def _fwe(null_max, observed):
    """``#{null max >= observed} / n`` for every voxel."""
    srt = np.sort(null_max)
    below = np.searchsorted(srt, observed - _REL_TOL * (np.abs(observed) + 1.0), side="left")
    return (srt.size - below) / srt.size
