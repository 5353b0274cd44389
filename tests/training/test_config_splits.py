"""Training config parsing, splits, metrics and the ridge baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bidsapp.errors import UsageError
from training.baselines import RidgeBaseline
from training.config import config_from_dict, load_config
from training.evaluate import regression_metrics
from training.splits import check_splits, load_or_create_splits, make_splits


def _minimal(**extra):
    values = {"family": "densenet-clinical", "work_dir": "work",
              "data": {"bids_dir": "ds", "derivatives": ["derivs"]}}
    values.update(extra)
    return values


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "c.toml").write_text(
        'family = "densenet-clinical"\nwork_dir = "w"\nseed = 3\n[data]\nbids_dir = "ds"\n'
        'derivatives = ["d"]\nfolds = 4\n[optim]\nlr = 0.001\nbetas = [0.9, 0.9]\n')
    (tmp_path / "c.yml").write_text(
        "family: densenet-clinical\nwork_dir: w\nseed: 3\ndata:\n  bids_dir: ds\n  derivatives: [d]\n"
        "  folds: 4\noptim:\n  lr: 0.001\n  betas: [0.9, 0.9]\n")
    a, b = load_config(tmp_path / "c.toml"), load_config(tmp_path / "c.yml")
    assert a == b
    assert a.optim.lr == 0.001 and a.data.folds == 4 and a.seed == 3
    assert a.optim.plateau_patience == 5 and a.optim.betas == (0.9, 0.9)  # seed-004 defaults
    assert a.work_dir.is_absolute()
    c = load_config(tmp_path / "c.toml", ["optim.max_epochs=9", "export.fp16=never"])
    assert c.optim.max_epochs == 9 and c.export.fp16 == "never"


@pytest.mark.parametrize("values, match", [
    (_minimal(optimiser={}), "optimiser"),
    (_minimal(optim={"learning_rate": 1}), "learning_rate"),
    (_minimal(optim={"lr": -1}), "optim.lr"),
    (_minimal(optim={"batch_size": 2.5}), "optim.batch_size"),
    (_minimal(data={"bids_dir": "ds"}), "derivatives"),
    (_minimal(data={"bids_dir": "ds", "derivatives": ["d"], "folds": 1}), "data.folds"),
    (_minimal(runtime={"device": "tpu"}), "runtime.device"),
    (_minimal(export={"fp16": "maybe"}), "export.fp16"),
    (_minimal(seed=True), "seed"),
])
def test_invalid_configs_name_the_key(values, match):
    with pytest.raises(UsageError, match=match):
        config_from_dict(values)


def test_splits_are_age_stratified_disjoint_and_reproducible():
    rng = np.random.default_rng(0)
    ages = {f"p{i:03d}": float(a) for i, a in enumerate(rng.uniform(20, 86, 134))}
    splits = make_splits(ages, folds=5, val_fraction=0.1, seed=0)
    assert splits == make_splits(ages, folds=5, val_fraction=0.1, seed=0)
    assert splits != make_splits(ages, folds=5, val_fraction=0.1, seed=1)
    tests = [set(f["test"]) for f in splits["folds"]]
    assert set().union(*tests) == set(ages) and sum(map(len, tests)) == 134
    assert sorted(map(len, tests)) == [26, 27, 27, 27, 27]
    all_ages = np.array(list(ages.values()))
    for fold in splits["folds"]:
        parts = [set(fold[p]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(ages)
        assert len(fold["val"]) == 13
        for part in ("test", "val"):  # each part spans the age range
            part_ages = np.array([ages[p] for p in fold[part]])
            assert abs(part_ages.mean() - all_ages.mean()) < 3.0
            assert part_ages.min() < 30 and part_ages.max() > 75
    check_splits(splits, list(ages))


def test_check_splits_refuses_leakage_and_unknown_participants():
    good = {"folds": [{"train": ["a", "b"], "val": ["c"], "test": ["d"]}]}
    check_splits(good, ["a", "b", "c", "d"])
    with pytest.raises(UsageError, match="leakage"):
        check_splits({"folds": [{"train": ["a", "b"], "val": ["b"], "test": ["d"]}]}, "abcd")
    with pytest.raises(UsageError, match="no usable scan"):
        check_splits({"folds": [{"train": ["a", "x"], "val": ["c"], "test": ["d"]}]}, "abcd")


def test_user_splits_file_takes_precedence(tmp_path):
    ages = {p: 20.0 + i for i, p in enumerate("abcdefghij")}
    user = {"folds": [{"fold": 0, "train": ["sub-a", "b", "c", "d", "e", "f"], "val": ["g"],
                       "test": ["h", "i", "j"]}]}
    (tmp_path / "user.json").write_text(json.dumps(user))
    got = load_or_create_splits(tmp_path / "splits.json", ages, folds=2, val_fraction=0.1, seed=0,
                                user_file=tmp_path / "user.json")
    assert got["folds"][0]["train"][0] == "a" and len(got["folds"]) == 1
    assert not (tmp_path / "splits.json").exists()
    created = load_or_create_splits(tmp_path / "splits.json", ages, folds=2, val_fraction=0.1, seed=0)
    assert (tmp_path / "splits.json").is_file()
    # written once: a later call with another seed reuses the file
    again = load_or_create_splits(tmp_path / "splits.json", ages, folds=2, val_fraction=0.1, seed=5)
    assert again == created


def test_regression_metrics_against_numpy_and_scipy(rng):
    from scipy import stats

    age = rng.uniform(20, 80, 50)
    pred = 0.7 * age + 15 + rng.normal(0, 4, 50)
    m = regression_metrics(age, pred)
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - age)))
    assert m["r"] == pytest.approx(stats.pearsonr(age, pred)[0])
    assert m["r2"] == pytest.approx(1 - np.sum((pred - age) ** 2) / np.sum((age - age.mean()) ** 2))
    assert m["pad_age_slope"] == pytest.approx(stats.linregress(age, pred - age).slope)
    assert m["n"] == 50


def test_ridge_matches_scikit_learn(rng):
    sklearn = pytest.importorskip("sklearn.linear_model")
    X = rng.normal(size=(60, 300))
    w = rng.normal(size=300) * (rng.random(300) < 0.1)
    y = X @ w + rng.normal(0, 0.5, 60) + 40
    ours = RidgeBaseline().fit(X, y)
    ref = sklearn.Ridge(alpha=ours.alpha_).fit(X, y)
    Xt = rng.normal(size=(10, 300))
    np.testing.assert_allclose(ours.predict(Xt), ref.predict(Xt), rtol=1e-6, atol=1e-6)
    # the closed-form leave-one-out error equals explicit refits
    loo = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        fit = sklearn.Ridge(alpha=ours.alpha_).fit(X[keep], y[keep])
        loo.append((fit.predict(X[i:i + 1])[0] - y[i]) ** 2)
    assert ours.loo_mse_ == pytest.approx(np.mean(loo), rel=0.05)
