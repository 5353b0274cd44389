"""Benchmark: brainage's permutation/TFCE engine against nilearn ``permuted_ols``.

Same data for both: N subjects in two equal groups, the MNI152 2 mm brain mask
(nilearn's bundled ICBM 2009a), smoothed Gaussian noise plus a planted group effect
(a sphere). Both run the same test: two-sided t, TFCE with 100 steps from each map's
own maximum (nilearn's rule; ``tfce_steps='per-map'``), 6-connectivity, max-statistic
FWE. nilearn takes ~5 s per TFCE permutation, so it is timed on ``--nilearn-perm``
permutations and its per-permutation time is extrapolated; brainage is then re-run on
exactly nilearn's relabellings (its random stream replicated) so the two sets of
FWE p-values can be compared voxel by voxel. The last line printed is
``speedup_vs_nilearn=<x> p_max_abs_diff=<y>``.

Usage::

    python benchmarks/bench_permutation.py            # --n-perm 1000
    python benchmarks/bench_permutation.py --quick    # small run (~1 min)
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import ndimage


def _data(n_subjects, seed, effect):
    from nilearn.datasets import load_mni152_brain_mask

    mask_img = load_mni152_brain_mask(resolution=2)
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(seed)
    group = np.repeat([1.0, 0.0], n_subjects // 2)
    ijk = np.indices(mask.shape)
    blob = np.sum((ijk - np.array([30, 60, 45])[:, None, None, None]) ** 2, axis=0) <= 5**2
    blob &= mask
    impulse = np.zeros((15, 15, 15))
    impulse[7, 7, 7] = 1.0
    sd = np.sqrt(np.sum(ndimage.gaussian_filter(impulse, 1.5) ** 2))  # SD of smoothed white noise
    rows = []
    for g in group:
        img = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.5) / sd
        rows.append(img[mask] + effect * g * blob[mask])
    return mask_img, mask, group, np.asarray(rows), blob[mask]


def _nilearn_relabellings(seed, n_perm, n):
    """The data-row permutations nilearn draws for ``random_state=seed, n_jobs=1``.

    nilearn draws one integer seed for its single chunk, then shuffles the tested
    variable cumulatively with ``RandomState.permutation``; permuting the regressor by
    ``idx`` equals permuting the data rows by its inverse.
    """
    outer = np.random.RandomState(seed)
    inner = np.random.RandomState(outer.randint(1, np.iinfo(np.int32).max - 1))
    order = np.arange(n)
    out = []
    for _ in range(n_perm):
        order = order[inner.permutation(n)]
        out.append(np.argsort(order))
    return np.asarray(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-perm", type=int, default=1000, help="brainage permutations (default 1000)")
    parser.add_argument("--nilearn-perm", type=int, default=None,
                        help="nilearn permutations to time (default 10; 2 with --quick)")
    parser.add_argument("--n-subjects", type=int, default=100)
    parser.add_argument("--effect", type=float, default=0.8, help="planted effect (SD units)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=1, help="brainage worker processes (default 1; "
                        "nilearn always runs with one job)")
    parser.add_argument("--quick", action="store_true", help="small run: 100 + 2 permutations")
    args = parser.parse_args(argv)
    n_perm = 100 if args.quick and args.n_perm == 1000 else args.n_perm
    nl_perm = args.nilearn_perm if args.nilearn_perm is not None else (2 if args.quick else 10)

    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    from bidsapp.stats import permutation_test

    mask_img, mask, group, data, blob = _data(args.n_subjects, args.seed, args.effect)
    design = np.column_stack([np.ones_like(group), group])
    print(f"data: N={data.shape[0]} (two groups), {data.shape[1]} voxels (MNI 2 mm mask), "
          f"planted effect {args.effect} SD in {int(blob.sum())} voxels")

    t0 = time.perf_counter()
    ours = permutation_test(data, design, [0, 1], mask=mask, n_perm=n_perm, tfce=True,
                            tfce_steps="per-map", two_sided=True, random_state=args.seed,
                            n_jobs=args.n_jobs)
    t_ours = (time.perf_counter() - t0) / ours.n_perm
    print(f"brainage (per-map, two-sided, {args.n_jobs} job(s)): {ours.n_perm} permutations, "
          f"{t_ours:.4f} s/permutation, "
          f"5000 permutations ~ {t_ours * 5000 / 60:.1f} min")

    t0 = time.perf_counter()
    fixed = permutation_test(data, design, [0, 1], mask=mask, n_perm=max(20, n_perm // 5),
                             tfce=True, tfce_steps="fixed", random_state=args.seed, n_jobs=args.n_jobs)
    t_fixed = (time.perf_counter() - t0) / fixed.n_perm
    print(f"brainage (randomise rule, one-sided): {t_fixed:.4f} s/permutation, "
          f"5000 permutations ~ {t_fixed * 5000 / 60:.1f} min")

    masker = NiftiMasker(mask_img).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ref = permuted_ols(group[:, None], data, confounding_vars=None, model_intercept=True,
                           n_perm=nl_perm, two_sided_test=True, random_state=args.seed, n_jobs=1,
                           tfce=True, masker=masker, output_type="dict", verbose=0)
        t_nl = (time.perf_counter() - t0) / (nl_perm + 1)
    print(f"nilearn permuted_ols(tfce=True): timed on {nl_perm} permutations (+ the unpermuted map), "
          f"{t_nl:.3f} s/permutation, extrapolated 5000 permutations ~ {t_nl * 5000 / 3600:.2f} h")

    same = permutation_test(data, design, [0, 1], mask=mask, tfce=True, tfce_steps="per-map",
                            two_sided=True,
                            permutations=_nilearn_relabellings(args.seed, nl_perm, data.shape[0]))
    p_ref = 10.0 ** -ref["logp_max_tfce"][0]
    p_diff = float(np.max(np.abs(p_ref - same.tfce_p_fwe[0])))
    t_diff = float(np.max(np.abs(10.0 ** -ref["logp_max_t"][0] - same.p_fwe[0])))
    tfce_rel = float(np.max(np.abs(ref["tfce"][0] - same.tfce[0])) / np.max(np.abs(ref["tfce"][0])))
    print(f"same {nl_perm} relabellings as nilearn: max |p_FWE(TFCE) diff| = {p_diff:.3g}, "
          f"max |p_FWE(t) diff| = {t_diff:.3g}, max relative TFCE diff = {tfce_rel:.2g}")
    sig = ours.tfce_p_fwe[0] <= 0.05
    print(f"planted effect, {ours.n_perm} permutations: {int(np.sum(sig & blob))}/{int(blob.sum())} "
          f"blob voxels and {int(np.sum(sig & ~blob))} other voxels at p_FWE(TFCE) <= 0.05")
    print(f"speedup_vs_nilearn={t_nl / t_ours:.1f} p_max_abs_diff={p_diff:.3g}")


if __name__ == "__main__":
    main()
