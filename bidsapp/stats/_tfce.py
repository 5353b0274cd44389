"""Threshold-free cluster enhancement (Smith & Nichols 2009) as FSL computes it.

``TFCE(v) = sum_{k : h_k <= t(v)} e_k(v)^E * h_k^H`` where ``e_k(v)`` is the number of
voxels in the cluster of ``{t >= h_k}`` that holds ``v`` (6-, 18- or 26-connected).
Like fslmaths/randomise (and nilearn), the sum is not multiplied by the step.

Step rules:

* ``dh`` given (randomise ``-T``): ``h_k = k * dh`` for every ``k`` with ``h_k`` up to the
  map's maximum; randomise sets ``dh = max(unpermuted t) / 100`` and reuses it for
  every permutation.
* ``dh=None`` (nilearn's rule, "per-map"): 100 equal steps from 0 to this map's own
  maximum, ``numpy.linspace(0, max, 101)[1:]``.

Instead of labelling connected components once per step (what fslmaths and nilearn
do), the whole hierarchy of clusters is built in one pass over the voxels sorted by
step level: at each level, the voxels that enter it are joined to their neighbours
already above it, and the clusters so connected are merged (a Kruskal-style union over
the mask's voxel graph, vectorised per level). Every cluster that exists over a range of levels
``(d, b]`` with constant size ``s`` contributes ``s^E * sum_{d<j<=b} h_j^H`` to each of
its voxels; summing these along each voxel's chain of enclosing clusters gives TFCE
exactly. Several maps are processed in one batch (disjoint graphs), which amortises
the per-level overhead over permutations.
"""

from __future__ import annotations

import logging

import numpy as np

from ._validation import _as_float_array, _check_float, _check_in, _check_int, _check_mask

__all__ = ["tfce_transform", "tfce_thresholds"]

LOGGER = logging.getLogger("brainage.stats")

_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


class _VoxelGraph:
    """Edges between neighbouring voxels of a 3D mask (each pair listed once)."""

    def __init__(self, mask, connectivity=6):
        _check_in(connectivity, tuple(_CONNECTIVITY), "connectivity")
        mask = _check_mask(mask)
        self.mask = mask
        self.connectivity = connectivity
        self.n_voxels = int(mask.sum())
        index = np.full(mask.shape, -1, dtype=np.int64)
        index[mask] = np.arange(self.n_voxels)
        max_sq = _CONNECTIVITY[connectivity]
        us, vs = [], []
        for d in np.ndindex(3, 3, 3):
            off = np.array(d) - 1
            # keep one of each +/- pair: the lexicographically positive offsets
            if not 0 < np.sum(off**2) <= max_sq or tuple(off) <= (0, 0, 0):
                continue
            src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, mask.shape))
            dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(off, mask.shape))
            a, b = index[src].ravel(), index[dst].ravel()
            keep = (a >= 0) & (b >= 0)
            us.append(a[keep])
            vs.append(b[keep])
        self.u = np.concatenate(us)
        self.v = np.concatenate(vs)
        # neighbour table (n_voxels, max degree), padded with the sentinel n_voxels
        src = np.concatenate([self.u, self.v])
        dst = np.concatenate([self.v, self.u])
        order = np.argsort(src, kind="stable")
        src, dst = src[order], dst[order]
        degree = np.bincount(src, minlength=self.n_voxels)
        width = int(degree.max()) if degree.size else 0
        slot = np.arange(src.size) - np.repeat(np.cumsum(degree) - degree, degree)
        self.neighbours = np.full((self.n_voxels, max(width, 1)), self.n_voxels, dtype=np.int64)
        self.neighbours[src, slot] = dst


def tfce_thresholds(max_value, dh=None, n_steps=100):
    """Cluster-forming thresholds ``h_1 < h_2 < ...`` used for one map.

    Parameters
    ----------
    max_value : float
        Maximum of the (one-sided) statistic map.
    dh : float, optional
        Fixed step (randomise). ``None`` gives ``n_steps`` steps up to ``max_value``.
    n_steps : int, default=100
        Number of steps when ``dh`` is None.

    Returns
    -------
    numpy.ndarray
        Thresholds; empty when ``max_value <= 0``.
    """
    if not np.isfinite(max_value) or max_value <= 0:
        return np.zeros(0)
    if dh is None:
        return np.linspace(0.0, max_value, n_steps + 1)[1:]
    n = int(np.floor(max_value / dh + 1e-9))
    # k*dh can exceed the maximum by one ulp at the top step: clip so the top voxel counts
    return np.minimum(np.arange(1, n + 1) * dh, max_value)


def _levels(values, thresholds):
    """Number of thresholds at or below each value (``searchsorted(..., 'right')``).

    ``values`` is (n_maps, n_voxels) with one increasing threshold array per map. The
    thresholds are multiples of their first element up to rounding, so the level is
    ``floor(value / h_1)`` corrected by one step where rounding put it on the wrong side.
    """
    n_maps = values.shape[0]
    counts = np.array([h.size for h in thresholds])
    padded = np.full((n_maps, counts.max() + 1), np.inf)
    for b, h in enumerate(thresholds):
        padded[b, :h.size] = h
    first = np.where(counts > 0, padded[:, 0], np.inf)[:, None]
    vals = np.where(np.isnan(values), -np.inf, values)
    with np.errstate(invalid="ignore", over="ignore"):
        lev = np.clip(np.nan_to_num(np.floor(vals / first), nan=0.0, posinf=1e18, neginf=0.0),
                      0, counts[:, None]).astype(np.int64)
    lev += (lev < counts[:, None]) & (vals >= np.take_along_axis(padded, lev, axis=1))
    below = np.take_along_axis(padded, np.maximum(lev - 1, 0), axis=1)
    lev -= (lev > 0) & (vals < below)
    return lev


def _components(i, j, n):
    """Connected components of a small undirected graph (edges i-j, n nodes).

    Hook every root onto the smaller root across each edge, then compress by pointer
    jumping; repeat until no edge joins two roots. Returns (n_components, component id
    per node). Cheaper than building a sparse matrix for the many tiny per-level graphs.
    """
    lab = np.arange(n)
    while True:
        li, lj = lab[i], lab[j]
        diff = li != lj
        if not diff.any():
            break
        i, j, li, lj = i[diff], j[diff], li[diff], lj[diff]
        # every root takes the smallest root it touches (roots only ever decrease)
        np.minimum.at(lab, np.maximum(li, lj), np.minimum(li, lj))
        while True:
            jumped = lab[lab]
            if np.array_equal(jumped, lab):
                break
            lab = jumped
    is_root = lab == np.arange(n)
    rank = np.cumsum(is_root) - 1
    return int(is_root.sum()), rank[lab]


def _tfce_batch(values, graph, thresholds, E, H):
    """TFCE of ``values`` (n_maps, n_voxels) given each map's thresholds."""
    n_maps, n_vox = values.shape
    k_max = max((h.size for h in thresholds), default=0)
    out = np.zeros(values.shape)
    if k_max == 0:
        return out
    # small integer levels let numpy use its linear-time radix sort below
    ltype = np.uint16 if k_max < np.iinfo(np.uint16).max else np.uint32
    levels = _levels(values, thresholds).astype(ltype)
    k_max = int(levels.max())
    if k_max == 0:
        return out
    if k_max > 10_000:
        LOGGER.warning("TFCE: %d threshold steps (the step is tiny against this map's maximum); "
                       "this will be slow", k_max)
    # one extra column per map: the "no neighbour" sentinel of the neighbour table (level 0)
    stride = n_vox + 1
    ext = np.zeros((n_maps, stride), dtype=ltype)
    ext[:, :n_vox] = levels
    flat = ext.ravel()
    active = np.flatnonzero(flat)
    order = np.argsort(ltype(k_max) - flat[active], kind="stable")
    vox = active[order]                      # supra-threshold voxels, highest level first
    vlev = flat[vox].astype(np.int64)
    n_act = vox.size
    pos = np.full(flat.size, -1, dtype=np.int64)
    pos[vox] = np.arange(n_act)
    v_cnt = np.bincount(vlev, minlength=k_max + 1)
    v_end = np.cumsum(v_cnt[::-1])[::-1]             # number of voxels at level >= k

    # level and sorted position of every neighbour of every supra-threshold voxel
    local = vox % stride
    nbr = graph.neighbours[local]
    if n_maps > 1:
        nbr += (vox - local)[:, None]
    nb_level = flat[nbr]
    nb_pos = pos[nbr]
    del nbr, local

    n_lab = 2 * n_act
    size = np.zeros(n_lab)
    size[:n_act] = 1.0
    born = np.zeros(n_lab, dtype=np.int64)
    born[:n_act] = vlev
    death = np.zeros(n_lab, dtype=np.int64)
    parent = np.full(n_lab, n_lab, dtype=np.int64)   # n_lab: sentinel "no parent"
    owner = np.zeros(n_lab, dtype=np.int64)
    owner[:n_act] = vox // stride
    top = np.arange(n_act, dtype=np.int64)           # current cluster of each active voxel
    remap = np.arange(n_lab, dtype=np.int64)
    slot = np.full(n_lab, -1, dtype=np.int64)        # scratch for de-duplication
    nxt = n_act
    created = np.zeros((k_max + 2, 2), dtype=np.int64)

    for k in range(k_max, 0, -1):
        created[k] = nxt
        s0, s1 = v_end[k] - v_cnt[k], v_end[k]
        if s1 == s0:
            continue
        # every edge joining clusters at level k touches a voxel that enters at level k:
        # its neighbours already at level >= k (entering ones are seen from both sides)
        rows, cols = np.nonzero(nb_level[s0:s1] >= k)
        if rows.size == 0:
            continue
        a = top[s0 + rows]
        b = top[nb_pos[s0 + rows, cols]]
        keep = a != b
        if not keep.any():
            continue
        ids = np.concatenate([a[keep], b[keep]])
        # de-duplicate cluster ids without sorting: first occurrence wins a slot
        seq = np.arange(ids.size)
        slot[ids] = seq
        touched = ids[slot[ids] == seq]
        slot[touched] = np.arange(touched.size)
        inv = slot[ids]
        slot[touched] = -1
        m = ids.size // 2
        n_cc, comp = _components(inv[:m], inv[m:], touched.size)
        new = nxt + comp
        parent[touched] = new
        death[touched] = k
        size[nxt:nxt + n_cc] = np.bincount(comp, weights=size[touched], minlength=n_cc)
        born[nxt:nxt + n_cc] = k
        owner[new] = owner[touched]
        remap[touched] = new
        nxt += n_cc
        created[k, 1] = nxt
        top[:s1] = remap[top[:s1]]

    # prefix sums of h^H per map: a cluster alive over levels (d, b] adds s^E (S[b] - S[d])
    cums = np.zeros((n_maps, k_max + 1))
    for bmap, h in enumerate(thresholds):
        kk = min(h.size, k_max)
        cums[bmap, 1:kk + 1] = np.cumsum(h[:kk] ** H)
        cums[bmap, kk + 1:] = cums[bmap, kk]
    own = size[:nxt] ** E * (cums[owner[:nxt], born[:nxt]] - cums[owner[:nxt], death[:nxt]])
    total = np.zeros(n_lab + 1)
    # ancestors are created at lower levels: walk levels upwards, merged clusters first
    for k in range(1, k_max + 1):
        lo, hi = created[k]
        if hi > lo:
            total[lo:hi] = own[lo:hi] + total[parent[lo:hi]]
        s0, s1 = v_end[k] - v_cnt[k], v_end[k]
        total[s0:s1] = own[s0:s1] + total[parent[s0:s1]]
    out_ext = np.zeros(flat.size)
    out_ext[vox] = total[:n_act]
    out[:] = out_ext.reshape(n_maps, stride)[:, :n_vox]
    return out


def tfce_transform(stat_map, mask=None, *, dh=None, n_steps=100, connectivity=6,
                   E=0.5, H=2.0, two_sided=False):
    """Threshold-free cluster enhancement of a 3D statistic map.

    Parameters
    ----------
    stat_map : numpy.ndarray, shape (X, Y, Z)
        Statistic map (e.g. t). Values outside ``mask`` are ignored.
    mask : numpy.ndarray of bool, shape (X, Y, Z), optional
        Voxels to enhance; default: every finite voxel.
    dh : float, optional
        Fixed step (randomise ``-T`` uses max(unpermuted t)/100). ``None``: ``n_steps``
        equal steps up to the map's own maximum (fslmaths/nilearn).
    n_steps : int, default=100
        Steps when ``dh`` is None.
    connectivity : {6, 18, 26}, default=6
        Voxel neighbourhood (randomise default 6 for 3D TFCE).
    E, H : float, default=0.5, 2.0
        Extent and height exponents.
    two_sided : bool, default=False
        Also enhance negative values (returned negative), as nilearn's
        ``two_sided_test=True``: with ``dh=None`` both signs then share steps up to
        ``max(|stat_map|)``.

    Returns
    -------
    numpy.ndarray, shape (X, Y, Z)
        TFCE values (0 outside the mask and where the statistic is below the first step).

    Examples
    --------
    >>> import numpy as np
    >>> t = np.zeros((3, 3, 3)); t[1, 1, 1] = 2.0
    >>> float(tfce_transform(t, n_steps=2)[1, 1, 1])  # 1 voxel: 1^0.5*(1^2 + 2^2)
    5.0
    """
    values = _as_float_array(stat_map, "stat_map", ndim=3)
    if mask is None:
        mask = np.isfinite(values)
    mask = _check_mask(mask)
    if mask.shape != values.shape:
        raise ValueError(f"'mask' shape {mask.shape} differs from 'stat_map' shape {values.shape}.")
    n_steps = _check_int(n_steps, "n_steps", minimum=1)
    if dh is not None:
        dh = _check_float(dh, "dh", low=0, inclusive=False)
    E = _check_float(E, "E", low=0)
    H = _check_float(H, "H", low=0)
    graph = _VoxelGraph(mask, connectivity)
    vec = values[mask]
    signs = (1.0, -1.0) if two_sided else (1.0,)
    top = np.nanmax(np.abs(vec)) if two_sided else np.nanmax(vec)
    maps = np.stack([s * vec for s in signs])
    ths = [tfce_thresholds(top if dh is None else np.nanmax(m), dh, n_steps) for m in maps]
    enhanced = _tfce_batch(maps, graph, ths, E, H)
    out = np.zeros(values.shape)
    out[mask] = enhanced[0] - (enhanced[1] if two_sided else 0.0)
    return out
