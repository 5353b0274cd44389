"""Seed-003 split: age decile x site strata, ten partitions, KL-chosen validation and test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy

from training.splits import check_splits, make_kl_split

RNG = np.random.default_rng(11)
IDS = [f"p{i:03d}" for i in range(137)]
AGES = dict(zip(IDS, np.round(RNG.uniform(18, 90, len(IDS)), 1)))
SITES = dict(zip(IDS, RNG.choice(["HH", "Guys", "IOP"], len(IDS))))


def _deciles(ids):
    age = np.array([AGES[i] for i in IDS])
    edges = np.quantile(age, np.linspace(0, 1, 11))  # min, 10th ... 90th percentile, max
    lookup = dict(zip(IDS, np.clip(np.digitize(age, edges[1:-1], right=False), 0, 9)))
    return np.array([lookup[i] for i in ids])


def test_every_participant_in_exactly_one_part_8_1_1():
    split = make_kl_split(AGES, SITES, seed=3)
    fold = split["folds"][0]
    parts = [fold["train"], fold["val"], fold["test"]]
    assert sorted(sum(parts, [])) == IDS  # each once
    # 137 dealt to ten partitions: seven of 14 and three of 13
    assert len(fold["val"]) in (13, 14) and len(fold["test"]) in (13, 14)
    assert len(fold["train"]) == 137 - len(fold["val"]) - len(fold["test"])
    check_splits(split, IDS)  # the engine's own leakage check accepts it


def test_chosen_partitions_have_the_smallest_kl_divergence():
    split = make_kl_split(AGES, SITES, seed=3)
    overall = np.bincount(_deciles(IDS), minlength=10) / len(IDS)
    kl = split["partition_kl"]
    assert len(kl) == 10
    fold = split["folds"][0]
    for part, k in (("test", split["test_partition"]), ("val", split["val_partition"])):
        own = entropy(np.bincount(_deciles(fold[part]), minlength=10), overall)
        assert own == pytest.approx(kl[k], abs=1e-12)
    assert kl[split["test_partition"]] <= min(kl)
    assert kl[split["val_partition"]] <= sorted(kl)[1]
    # the train part is the other eight partitions: its histogram is their sum
    train_hist = np.bincount(_deciles(fold["train"]), minlength=10)
    test_val = np.bincount(_deciles(fold["test"] + fold["val"]), minlength=10)
    np.testing.assert_array_equal(train_hist + test_val, np.bincount(_deciles(IDS), minlength=10))


def test_strata_are_spread_evenly_over_the_partitions():
    split = make_kl_split(AGES, SITES, seed=3)
    fold = split["folds"][0]
    decile = dict(zip(IDS, _deciles(IDS)))
    for part in ("test", "val"):
        # a stratum (decile x site) of n participants puts floor(n/10) or ceil(n/10) in each partition
        for d in range(10):
            for site in ("HH", "Guys", "IOP"):
                n = sum(decile[i] == d and SITES[i] == site for i in IDS)
                got = sum(decile[i] == d and SITES[i] == site for i in fold[part])
                assert n // 10 <= got <= -(-n // 10)


def test_deterministic_for_a_seed():
    assert make_kl_split(AGES, SITES, seed=3) == make_kl_split(AGES, SITES, seed=3)
    assert make_kl_split(AGES, SITES, seed=3)["folds"] != make_kl_split(AGES, SITES, seed=4)["folds"]
    # without sites every participant is one site
    assert make_kl_split(AGES, None, seed=1) == make_kl_split(AGES, {}, seed=1)


def test_too_few_participants():
    with pytest.raises(ValueError, match="at least 10"):
        make_kl_split({f"{i}": 20.0 + i for i in range(9)})
