"""Linear stacking of the seed-003 networks' predictions, nested F-tests, MAE tables.

Jomsky et al. combine the age predicted from T1w (``T``) and from the synthetic CBV map
(``A``) with an ordinary least-squares model fitted on the training and validation
predictions and evaluate it on the test set: stacks ``T``, ``A``, ``TA`` and ``TAS`` (plus sex,
coded 0 female / 1 male), compared with nested-model F-tests (their Table 1) and tabulated as
MAE per 5-year age band and per study (Tables 2-3).  Without a CBV branch the stacks are
``T`` and ``TS``.

Data frames here have one row per scan with the columns ``age``, ``t1w`` (T1w-predicted age),
optionally ``cbv`` (CBV-predicted age), ``sex`` (any of :data:`SEX_CODES`) and ``site``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

# accepted sex labels (case-insensitive) and their code, 0 female / 1 male (the paper's): one
# table for training and for the app's predictor
from bidsapp.bids.ages import SEX_CODES

__all__ = ["STACKS", "SEX_CODES", "code_sex", "available_stacks", "default_comparisons",
           "fit_stack", "fit_stacks", "nested_f_tests", "mae_by_group", "age_band"]

#: Predictors of each stack (``sex`` is coded by :func:`code_sex`).
STACKS: dict[str, tuple[str, ...]] = {"T": ("t1w",), "A": ("cbv",), "TA": ("t1w", "cbv"),
                                      "TAS": ("t1w", "cbv", "sex"), "TS": ("t1w", "sex")}


def code_sex(values: Sequence[object]) -> np.ndarray:
    """Sex labels as 0 (female) / 1 (male).

    Raises
    ------
    ValueError
        Naming the labels that are not in :data:`SEX_CODES`.

    Examples
    --------
    >>> code_sex(["F", "male", 1, "m"]).tolist()
    [0.0, 1.0, 1.0, 1.0]
    """
    out, bad = [], set()
    for value in values:
        key = str(int(value)) if isinstance(value, (int, np.integer, float)) and value in (0, 1) \
            else str(value).strip().lower()
        if key not in SEX_CODES:
            bad.add(str(value))
        out.append(SEX_CODES.get(key, np.nan))
    if bad:
        raise ValueError(f"sex must be one of {sorted(SEX_CODES)} (0 female, 1 male), got {sorted(bad)}")
    return np.asarray(out, dtype=float)


def available_stacks(frame: pd.DataFrame) -> list[str]:
    """The stacks whose predictors ``frame`` has (a ``sex`` column counts only if fully coded)."""
    have = {c for c in ("t1w", "cbv") if c in frame.columns and frame[c].notna().all()}
    if "sex" in frame.columns:
        try:
            code_sex(frame["sex"])
            have.add("sex")
        except ValueError:
            pass
    return [name for name, cols in STACKS.items() if set(cols) <= have]


def default_comparisons(stacks: Sequence[str]) -> list[tuple[str, str]]:
    """The paper's nested pairs among ``stacks``: T vs TA, A vs TA, TA vs TAS; else T vs TS."""
    pairs = [("T", "TA"), ("A", "TA"), ("TA", "TAS")] if "TA" in stacks else [("T", "TS")]
    return [(a, b) for a, b in pairs if a in stacks and b in stacks]


def _design(frame: pd.DataFrame, stack: str) -> np.ndarray:
    import statsmodels.api as sm

    cols = [code_sex(frame["sex"]) if c == "sex" else frame[c].to_numpy(dtype=float)
            for c in STACKS[stack]]
    return sm.add_constant(np.column_stack(cols), has_constant="add")


def fit_stack(frame: pd.DataFrame, stack: str):
    """Ordinary least squares of ``age`` on the stack's predictors (with intercept).

    Returns
    -------
    statsmodels.regression.linear_model.RegressionResultsWrapper
    """
    import statsmodels.api as sm

    if stack not in STACKS:
        raise ValueError(f"stack must be one of {sorted(STACKS)}, got {stack!r}")
    return sm.OLS(frame["age"].to_numpy(dtype=float), _design(frame, stack)).fit()


def fit_stacks(fit: pd.DataFrame, test: pd.DataFrame,
               stacks: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit each stack on ``fit`` (train + validation) and predict ``test``.

    Parameters
    ----------
    fit, test : DataFrame
        Scans with the columns of the module docstring.
    stacks : sequence of str, optional
        Default: every stack ``fit`` has the predictors for (:func:`available_stacks`).

    Returns
    -------
    predictions : DataFrame
        ``test``'s index, one column per stack (years).
    summary : DataFrame
        Per stack: coefficients (``coef``: intercept first), test MAE, MSE and R²
        (``1 - SS_res / SS_tot``) and the fit's n.
    """
    stacks = list(stacks or available_stacks(fit))
    age = test["age"].to_numpy(dtype=float)
    predictions, rows = {}, []
    for stack in stacks:
        model = fit_stack(fit, stack)
        pred = model.predict(_design(test, stack))
        predictions[stack] = pred
        rows.append({"stack": stack, "predictors": "+".join(STACKS[stack]),
                     "coef": [float(c) for c in model.params], "n_fit": int(model.nobs),
                     "mae": float(np.mean(np.abs(pred - age))),
                     "mse": float(np.mean((pred - age) ** 2)),
                     "r2": float(1 - np.sum((pred - age) ** 2) / np.sum((age - age.mean()) ** 2))})
    return pd.DataFrame(predictions, index=test.index), pd.DataFrame(rows).set_index("stack")


def nested_f_tests(frame: pd.DataFrame,
                   comparisons: Sequence[tuple[str, str]] | None = None) -> pd.DataFrame:
    """F-tests of nested stacks fitted on ``frame`` (R's ``anova(restricted, full)``).

    ``F = ((RSS_r - RSS_f) / (df_r - df_f)) / (RSS_f / df_f)`` with the residual degrees of
    freedom ``df``; computed by statsmodels' ``compare_f_test``.

    Returns
    -------
    DataFrame
        One row per pair: ``restricted``, ``full``, ``f``, ``p``, ``df_num``, ``df_denom``,
        ``rss_restricted``, ``rss_full``.
    """
    pairs = list(comparisons or default_comparisons(available_stacks(frame)))
    rows = []
    for restricted, full in pairs:
        if not set(STACKS[restricted]) < set(STACKS[full]):
            raise ValueError(f"{restricted} is not nested in {full}")
        small, big = fit_stack(frame, restricted), fit_stack(frame, full)
        f, p, df_num = big.compare_f_test(small)
        rows.append({"restricted": restricted, "full": full, "f": float(f), "p": float(p),
                     "df_num": int(df_num), "df_denom": int(big.df_resid),
                     "rss_restricted": float(small.ssr), "rss_full": float(big.ssr)})
    return pd.DataFrame(rows)


def age_band(age: Sequence[float], width: float = 5.0) -> list[str]:
    """Band labels ``"lo-hi"`` of ``width`` years (lower bound included).

    Examples
    --------
    >>> age_band([19.9, 20.0, 24.99, 83])
    ['15-20', '20-25', '20-25', '80-85']
    """
    lows = np.floor(np.asarray(age, dtype=float) / width) * width
    return [f"{lo:g}-{lo + width:g}" for lo in lows]


def mae_by_group(frame: pd.DataFrame, predictions: Mapping[str, Sequence[float]] | pd.DataFrame,
                 by: str = "age_band", width: float = 5.0) -> pd.DataFrame:
    """MAE of each model per 5-year age band or per site (the paper's Tables 2 and 3).

    Parameters
    ----------
    frame : DataFrame
        Scans with ``age`` (and ``site`` for ``by="site"``).
    predictions : mapping or DataFrame
        Model name -> predictions aligned with ``frame``'s rows.
    by : {"age_band", "site"}
    width : float
        Band width in years for ``by="age_band"``.

    Returns
    -------
    DataFrame
        Index: group (age bands in ascending order), columns: ``n`` and one MAE per model.
    """
    if by == "age_band":
        groups = age_band(frame["age"], width)
        order = sorted(set(groups), key=lambda g: float(g.split("-")[0]))
    elif by == "site":
        groups = [str(s) for s in frame["site"]]
        order = sorted(set(groups))
    else:
        raise ValueError(f"by must be 'age_band' or 'site', got {by!r}")
    age = frame["age"].to_numpy(dtype=float)
    error = pd.DataFrame({name: np.abs(np.asarray(p, dtype=float) - age)
                          for name, p in dict(predictions).items()})
    error.insert(0, "n", 1)
    table = error.groupby(np.asarray(groups)).agg({c: ("sum" if c == "n" else "mean")
                                                   for c in error.columns})
    table.index.name = by
    return table.loc[order]
