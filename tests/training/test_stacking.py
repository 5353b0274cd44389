"""Seed-003 stacking: OLS stacks against numpy, nested F-tests against a hand computation from
residual sums of squares, MAE per age band and per site with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from training.stacking import (available_stacks, code_sex, default_comparisons, fit_stacks,
                               mae_by_group, nested_f_tests)


def _frame(n=120, seed=0, cbv=True):
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 85, n)
    sex = rng.choice(["F", "M"], n)
    male = (sex == "M").astype(float)
    frame = pd.DataFrame({"age": age, "sex": sex, "site": rng.choice(["A", "B"], n),
                          # T1w prediction: regression to the mean plus noise; males look older
                          "t1w": 0.8 * age + 9 + 3.0 * male + rng.normal(0, 4, n)})
    if cbv:
        frame["cbv"] = 0.7 * age + 14 + rng.normal(0, 5, n)
    return frame


def _ols(frame, cols):
    X = np.column_stack([np.ones(len(frame))] + [
        code_sex(frame[c]) if c == "sex" else frame[c].to_numpy(float) for c in cols])
    beta, *_ = np.linalg.lstsq(X, frame["age"].to_numpy(float), rcond=None)
    rss = float(np.sum((frame["age"].to_numpy(float) - X @ beta) ** 2))
    return beta, rss, len(frame) - X.shape[1]


def test_stacks_are_least_squares_fits_evaluated_on_test():
    frame = _frame()
    fit, test = frame.iloc[:96], frame.iloc[96:]
    predictions, summary = fit_stacks(fit, test)
    assert list(predictions.columns) == ["T", "A", "TA", "TAS", "TS"]
    for stack, cols in (("T", ["t1w"]), ("TA", ["t1w", "cbv"]), ("TAS", ["t1w", "cbv", "sex"])):
        beta, _, _ = _ols(fit, cols)
        np.testing.assert_allclose(summary.loc[stack, "coef"], beta, rtol=1e-8)
        X = np.column_stack([np.ones(len(test))] + [
            code_sex(test[c]) if c == "sex" else test[c].to_numpy(float) for c in cols])
        np.testing.assert_allclose(predictions[stack], X @ beta, rtol=1e-10)
        err = predictions[stack].to_numpy() - test["age"].to_numpy()
        assert summary.loc[stack, "mae"] == pytest.approx(np.mean(np.abs(err)))
        assert summary.loc[stack, "mse"] == pytest.approx(np.mean(err ** 2))
        ss_tot = np.sum((test["age"] - test["age"].mean()) ** 2)
        assert summary.loc[stack, "r2"] == pytest.approx(1 - np.sum(err ** 2) / ss_tot)
    assert summary.loc["TAS", "n_fit"] == 96


def test_nested_f_tests_match_the_residual_sums_of_squares():
    frame = _frame()
    table = nested_f_tests(frame)
    assert list(zip(table.restricted, table.full)) == [("T", "TA"), ("A", "TA"), ("TA", "TAS")]
    for row in table.itertuples():
        cols = {"T": ["t1w"], "A": ["cbv"], "TA": ["t1w", "cbv"], "TAS": ["t1w", "cbv", "sex"]}
        _, rss_r, df_r = _ols(frame, cols[row.restricted])
        _, rss_f, df_f = _ols(frame, cols[row.full])
        f = ((rss_r - rss_f) / (df_r - df_f)) / (rss_f / df_f)
        assert row.f == pytest.approx(f, rel=1e-9)
        assert row.p == pytest.approx(stats.f.sf(f, df_r - df_f, df_f), rel=1e-9)
        assert (row.df_num, row.df_denom) == (df_r - df_f, df_f)
        assert row.rss_full == pytest.approx(rss_f) and row.rss_restricted == pytest.approx(rss_r)
    # the planted sex effect is found; without CBV the pair is T vs TS
    t1w_only = _frame(cbv=False)
    assert available_stacks(t1w_only) == ["T", "TS"]
    pair = nested_f_tests(t1w_only)
    assert list(zip(pair.restricted, pair.full)) == [("T", "TS")] and pair.p[0] < 0.05
    with pytest.raises(ValueError, match="not nested"):
        nested_f_tests(frame, [("A", "TS")])


def test_mae_by_age_band_and_site_known_answers():
    frame = pd.DataFrame({"age": [21.0, 24.0, 26.0, 83.0], "site": ["B", "A", "A", "B"]})
    predictions = {"m1": [23.0, 24.0, 20.0, 80.0], "m2": [21.0, 28.0, 26.0, 84.0]}
    bands = mae_by_group(frame, predictions, "age_band")
    assert list(bands.index) == ["20-25", "25-30", "80-85"]
    assert bands["n"].tolist() == [2, 1, 1]
    assert bands["m1"].tolist() == [1.0, 6.0, 3.0] and bands["m2"].tolist() == [2.0, 0.0, 1.0]
    sites = mae_by_group(frame, predictions, "site")
    assert list(sites.index) == ["A", "B"]
    assert sites["m1"].tolist() == [3.0, 2.5] and sites["m2"].tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match="by must be"):
        mae_by_group(frame, predictions, "decade")


def test_sex_coding_and_default_pairs():
    assert code_sex(["female", "M", 0, "w"]).tolist() == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="other"):
        code_sex(["F", "other"])
    frame = _frame(n=20, cbv=False).assign(sex=None)  # unknown sex: no sex stacks
    assert available_stacks(frame) == ["T"]
    assert default_comparisons(["T", "A", "TA", "TAS"]) == [("T", "TA"), ("A", "TA"), ("TA", "TAS")]
