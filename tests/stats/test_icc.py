"""ICC against Shrout & Fleiss (1979) and pingouin."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bidsapp import stats

# Shrout & Fleiss 1979, Table 2: 6 targets rated by 4 judges
SF = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)


def test_shrout_fleiss_table():
    expected = {"1,1": 0.17, "2,1": 0.29, "3,1": 0.71, "1,k": 0.44, "2,k": 0.62, "3,k": 0.91}
    for kind, value in expected.items():
        assert round(stats.icc(SF, kind), 2) == value


def test_matches_pingouin(rng):
    pg = pytest.importorskip("pingouin")
    n, k = 15, 3
    y = rng.normal(size=(n, 1)) * 2 + rng.normal(size=(n, k)) + np.array([0.0, 0.5, -0.3])
    long = pd.DataFrame({"t": np.repeat(np.arange(n), k), "r": np.tile(np.arange(k), n), "s": y.ravel()})
    ref = pg.intraclass_corr(long, targets="t", raters="r", ratings="s").set_index("Type")["ICC"]
    names = {"1,1": "ICC(1,1)", "2,1": "ICC(A,1)", "3,1": "ICC(C,1)", "1,k": "ICC(1,k)",
             "2,k": "ICC(A,k)", "3,k": "ICC(C,k)"}
    for kind, label in names.items():
        assert stats.icc(y, kind) == pytest.approx(ref[label], rel=1e-8)


def test_vectorised_over_voxels(rng):
    y = rng.normal(size=(12, 2, 40)) + rng.normal(size=(12, 1, 40)) * np.linspace(0, 3, 40)
    vec = stats.icc(y, "2,1")
    for j in (0, 17, 39):
        assert vec[j] == pytest.approx(stats.icc(y[:, :, j], "2,1"), rel=1e-12)
    # reliability rises with the between-subject spread that was planted
    assert vec[-5:].mean() > 0.8 > 0.2 > vec[:3].mean()


def test_fisher_pairs_known_answer_and_limit(rng):
    x1, x2 = np.array([1.0, 2, 3]), np.array([2.0, 2, 4])
    m = 14 / 6
    s2 = (np.sum((x1 - m) ** 2) + np.sum((x2 - m) ** 2)) / 6
    expected = np.sum((x1 - m) * (x2 - m)) / (3 * s2)
    assert stats.icc_fisher_pairs(x1, x2) == pytest.approx(expected, rel=1e-12)
    # for many pairs, Fisher's form approaches ICC(1,1)
    true = rng.normal(size=20000)
    a, b = true + rng.normal(size=20000), true + rng.normal(size=20000)
    assert stats.icc_fisher_pairs(a, b) == pytest.approx(stats.icc(np.c_[a, b], "1,1"), abs=2e-3)


def test_argument_checks():
    with pytest.raises(ValueError, match="kind"):
        stats.icc(SF, "2,2")
    with pytest.raises(ValueError, match="at least 2"):
        stats.icc(SF[:1], "2,1")
