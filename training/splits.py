"""Age-stratified k-fold splits by participant, written once and reusable.

Within each fold, the participants not in the test part are split again into training and
validation (early stopping, learning-rate schedule).  A user-supplied splits file takes
precedence; it is checked for overlaps and unknown participants.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bidsapp.errors import UsageError

__all__ = ["make_splits", "make_kl_split", "check_splits", "load_or_create_splits"]

LOGGER = logging.getLogger("brainage.training")
_PARTS = ("train", "val", "test")


def _stratified_pick(ids: Sequence[str], ages: Sequence[float], n_groups: int,
                     rng: np.random.Generator) -> list[int]:
    """Group index per participant: consecutive blocks of ``n_groups`` in age order are dealt
    at random, one participant to each group, so every group spans the whole age range."""
    order = np.argsort(np.asarray(ages, dtype=float), kind="stable")
    groups = np.empty(len(ids), dtype=int)
    start = 0
    offset = 0
    while start < len(order):
        block = order[start:start + n_groups]
        # rotate which groups receive the leftovers of an incomplete last block
        assign = (rng.permutation(n_groups) + offset) % n_groups
        groups[block] = assign[:len(block)]
        start += n_groups
        offset += 1
    return groups.tolist()


def make_splits(ages: Mapping[str, float], *, folds: int = 5, val_fraction: float = 0.1,
                seed: int = 0) -> dict:
    """Age-stratified k-fold splits of participants.

    Parameters
    ----------
    ages : mapping
        Participant label -> age (one age per participant, e.g. the first session's).
    folds : int
        Number of folds (each participant is in exactly one test part).
    val_fraction : float
        Share of all participants moved from each fold's training part to validation.
    seed : int

    Returns
    -------
    dict
        ``{"folds": [{"fold": k, "train": [...], "val": [...], "test": [...]}, ...], ...}``.

    Examples
    --------
    >>> s = make_splits({f"{i:02d}": 20 + i for i in range(20)}, folds=4)
    >>> [len(f["test"]) for f in s["folds"]]
    [5, 5, 5, 5]
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
    ids = sorted(ages)
    if len(ids) < 2 * folds:
        raise ValueError(f"need at least {2 * folds} participants for {folds} folds, got {len(ids)}")
    rng = np.random.default_rng([seed, 4])
    test_group = _stratified_pick(ids, [ages[i] for i in ids], folds, rng)
    out = []
    for k in range(folds):
        test = [i for i, g in zip(ids, test_group) if g == k]
        rest = [i for i, g in zip(ids, test_group) if g != k]
        n_val = max(1, int(round(val_fraction * len(ids))))
        # every (len(rest)/n_val)-th participant in age order, random phase: age-stratified
        order = sorted(rest, key=lambda p: (ages[p], p))
        positions = np.floor((np.arange(n_val) + rng.random()) * len(order) / n_val).astype(int)
        val = sorted(order[p] for p in positions)
        train = sorted(set(rest) - set(val))
        out.append({"fold": k, "train": train, "val": val, "test": sorted(test)})
    return {"version": 1, "unit": "participant", "seed": seed, "stratified_by": "age",
            "val_fraction": val_fraction, "folds": out}


def make_kl_split(ages: Mapping[str, float], sites: Mapping[str, str | None] | None = None, *,
                  n_partitions: int = 10, seed: int = 0) -> dict:
    """One train/validation/test split of seed 003 (Jomsky et al.): KL-chosen partitions.

    Participants are stratified by age decile (bin edges: minimum, the 10th to 90th
    percentiles and maximum, ``numpy.quantile``) crossed with site; each stratum is shuffled
    and dealt in turn to ``n_partitions`` partitions (continuing where the previous stratum
    stopped, so partition sizes differ by at most one).  The partition whose age-decile
    histogram has the smallest Kullback-Leibler divergence ``KL(partition || all)`` from the
    whole set's becomes the test part, the next smallest the validation part, the rest the
    training part (8:1:1 for ten partitions).

    Parameters
    ----------
    ages : mapping
        Participant label -> age (one per participant).
    sites : mapping, optional
        Participant label -> site or study (missing or None: one common site).
    n_partitions : int
        Number of partitions (paper: 10).
    seed : int

    Returns
    -------
    dict
        The splits-file structure of :func:`make_splits` with one fold, plus
        ``partition_kl`` (KL of each partition, nats) and the chosen partition indices.

    Examples
    --------
    >>> s = make_kl_split({f"{i:02d}": 20 + i for i in range(40)})
    >>> [len(s["folds"][0][p]) for p in ("train", "val", "test")]
    [32, 4, 4]
    """
    from scipy.stats import entropy

    if isinstance(n_partitions, bool) or not isinstance(n_partitions, int) or n_partitions < 3:
        raise ValueError(f"n_partitions must be an int >= 3, got {n_partitions!r}")
    ids = sorted(ages)
    if len(ids) < n_partitions:
        raise ValueError(f"need at least {n_partitions} participants for {n_partitions} "
                         f"partitions, got {len(ids)}")
    age = np.array([float(ages[i]) for i in ids])
    edges = np.quantile(age, np.linspace(0.0, 1.0, 11))
    decile = np.searchsorted(edges[1:-1], age, side="right")  # 0..9, the maximum in the last
    site = [str((sites or {}).get(i) or "n/a") for i in ids]
    rng = np.random.default_rng([seed, 3])
    partition = np.empty(len(ids), dtype=int)
    dealt = 0
    for stratum in sorted(set(zip(decile.tolist(), site))):
        members = [j for j in range(len(ids)) if (decile[j], site[j]) == stratum]
        for n, j in enumerate(rng.permutation(members)):
            partition[j] = (dealt + n) % n_partitions
        dealt += len(members)
    overall = np.bincount(decile, minlength=10) / len(ids)
    kl = [float(entropy(np.bincount(decile[partition == k], minlength=10), overall))
          for k in range(n_partitions)]
    test_k, val_k = sorted(range(n_partitions), key=lambda k: (kl[k], k))[:2]
    parts = {"test": [i for i, k in zip(ids, partition) if k == test_k],
             "val": [i for i, k in zip(ids, partition) if k == val_k],
             "train": [i for i, k in zip(ids, partition) if k not in (test_k, val_k)]}
    return {"version": 1, "unit": "participant", "seed": seed,
            "stratified_by": "age decile x site", "scheme": "kl-partitions",
            "n_partitions": n_partitions, "partition_kl": kl, "test_partition": test_k,
            "val_partition": val_k, "folds": [{"fold": 0, **parts}]}


def check_splits(splits: Mapping, participants: Sequence[str]) -> None:
    """Refuse splits with overlapping parts or unknown participants; warn about unused ones.

    Raises
    ------
    UsageError
    """
    folds = splits.get("folds") if isinstance(splits, Mapping) else None
    if not isinstance(folds, list) or not folds:
        raise UsageError("splits: expected {'folds': [{'train': [...], 'val': [...], 'test': [...]}, ...]}")
    known = set(participants)
    tested: set[str] = set()
    for k, fold in enumerate(folds):
        parts = {}
        for part in _PARTS:
            values = fold.get(part)
            if not isinstance(values, list) or (part != "test" and not values):
                raise UsageError(f"splits fold {k}: '{part}' must be a list"
                                 f"{'' if part == 'test' else ' with at least one participant'}")
            parts[part] = {str(v).removeprefix("sub-") for v in values}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = parts[a] & parts[b]
            if both:
                raise UsageError(f"splits fold {k}: participant(s) {sorted(both)[:5]} are in both "
                                 f"'{a}' and '{b}' (data leakage)")
        unknown = set().union(*parts.values()) - known
        if unknown:
            raise UsageError(f"splits fold {k}: participant(s) {sorted(unknown)[:5]} have no "
                             "usable scan (no age or no derivatives)")
        tested |= parts["test"]
    unused = known - set().union(*({str(v).removeprefix("sub-") for v in f["train"] + f["val"] + f["test"]}
                                   for f in folds))
    if unused:
        LOGGER.warning("%d participant(s) are in no split (e.g. %s)", len(unused), sorted(unused)[0])


def load_or_create_splits(path: Path, ages: Mapping[str, float], *, folds: int,
                          val_fraction: float, seed: int, user_file: Path | None = None) -> dict:
    """The user's splits file if given, else ``path`` if it exists, else new splits written there.

    The splits are created once: a later run (or a resumed one) reuses ``path`` even if the
    dataset grew, so the folds of a trained model never change under it.
    """
    if user_file is not None:
        if not Path(user_file).is_file():
            raise UsageError(f"data.splits_file {user_file} does not exist")
        splits = json.loads(Path(user_file).read_text(encoding="utf-8"))
        LOGGER.info("using the user-supplied splits %s", user_file)
    elif Path(path).is_file():
        splits = json.loads(Path(path).read_text(encoding="utf-8"))
        LOGGER.info("using the existing splits %s", path)
    else:
        splits = make_splits(ages, folds=folds, val_fraction=val_fraction, seed=seed)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(splits, indent=1), encoding="utf-8")
        LOGGER.info("wrote new age-stratified %d-fold splits to %s", folds, path)
    for fold in splits.get("folds", []):
        for part in _PARTS:
            if isinstance(fold.get(part), list):
                fold[part] = [str(v).removeprefix("sub-") for v in fold[part]]
    check_splits(splits, list(ages))
    return splits
