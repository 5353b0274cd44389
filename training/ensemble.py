"""Multi-level ensembles (MLens, seed 002): ridge heads, cross-validated levels, card.

The engine trains the base models (members ``<sub-ensemble>/base<b>``) of every fold; this
module stacks them as Hofmann et al. did:

* per fold and sub-ensemble, a **head**: ridge regression (alpha 1) of age on the base models'
  predictions for the fold's *validation* scans, applied to its test scans;
* over all folds, a **top level**: ridge regression (alpha 1) of age on the sub-ensembles'
  held-out predictions, evaluated by an inner 5-fold cross-validation (the MLens CV
  predictions) and finally fitted on all of them (the shipped top head);
* per level, the CV MAE (base models, sub-ensembles, MLens) and the empirical coverage of the
  95 % interval (see :func:`mlens_interval`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bidsapp.inference.weights import sha256_file

from .data import InputCache, ScanRecord
from .evaluate import predict_views, regression_metrics

__all__ = ["fit_ridge", "mlens_interval", "grouped_folds",
           "top_level_cross_validation", "conformal_halfwidth", "export_mlens"]

LOGGER = logging.getLogger("brainage.training")


def fit_ridge(X: np.ndarray, y: Sequence[float], alpha: float = 1.0) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept (scikit-learn's ``Ridge(alpha)``).

    Parameters
    ----------
    X : ndarray, shape (n, p)
    y : sequence of float, length n
    alpha : float
        L2 penalty of the coefficients (the paper: 1).

    Returns
    -------
    coef : ndarray, shape (p,)
    intercept : float

    Examples
    --------
    >>> coef, b = fit_ridge(np.array([[0.0], [1.0], [2.0]]), [1.0, 3.0, 5.0], alpha=0.0)
    >>> np.round(coef, 6).tolist(), round(b, 6)
    ([2.0], 1.0)
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < 1:
        raise ValueError(f"X must be (n, p) and y (n,), got {X.shape} and {y.shape}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    x_mean, y_mean = X.mean(axis=0), float(y.mean())
    Xc = X - x_mean
    gram = Xc.T @ Xc + alpha * np.eye(X.shape[1])
    coef = np.linalg.lstsq(gram, Xc.T @ (y - y_mean), rcond=None)[0]
    return coef, float(y_mean - x_mean @ coef)


def mlens_interval(prediction: float, base: np.ndarray, subensembles: np.ndarray,
                   level: float = 0.95) -> tuple[float, float]:
    """The MLens interval of one scan: ``prediction ± half-width`` of the top-level members.

    Parameters
    ----------
    prediction : float
        MLens prediction.
    base : ndarray, shape (n_subensembles, n_base)
        Base-model predictions of one fold ensemble.
    subensembles : ndarray, shape (n_subensembles,)
        Sub-ensemble (head) predictions of the same fold ensemble.
    level : float

    Returns
    -------
    (float, float)
        With two or more sub-ensembles the spread across sub-ensembles (the paper's MLens
        uncertainty), otherwise across the base models of the one sub-ensemble; the half-width
        is :func:`bidsapp.inference.mlens.fold_halfwidth` (what inference uses).
    """
    from bidsapp.inference.mlens import fold_halfwidth

    values = subensembles if len(subensembles) >= 2 else np.asarray(base)[0]
    half = fold_halfwidth(values, level)
    return prediction - half, prediction + half


def grouped_folds(groups: Sequence[str], ages: Sequence[float], n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row: participants (``groups``) dealt in age order, at random within blocks.

    Every fold spans the age range and all rows of a participant share a fold.
    """
    groups = list(groups)
    first: dict[str, float] = {}
    for g, a in zip(groups, ages):
        first.setdefault(g, float(a))
    names = sorted(first, key=lambda g: (first[g], g))
    rng = np.random.default_rng(seed)
    assign: dict[str, int] = {}
    for start in range(0, len(names), n_folds):
        block = names[start:start + n_folds]
        for g, f in zip(block, rng.permutation(n_folds)[:len(block)]):
            assign[g] = int(f)
    return np.array([assign[g] for g in groups], dtype=int)


def conformal_halfwidth(residuals: Sequence[float], level: float = 0.95) -> float:
    """Split-conformal half-width: the ``ceil((n+1) level)``-th smallest ``|residual|``.

    Examples
    --------
    >>> conformal_halfwidth(np.arange(1, 20), 0.9)
    18.0
    """
    r = np.sort(np.abs(np.asarray(residuals, dtype=float)))
    if r.size == 0:
        return float("nan")
    rank = min(r.size, int(math.ceil((r.size + 1) * level)))
    return float(r[rank - 1])


def top_level_cross_validation(X: np.ndarray, ages: Sequence[float], groups: Sequence[str], *,
                               alpha: float = 1.0, n_folds: int = 5, seed: int = 0,
                               level: float = 0.95) -> dict[str, Any]:
    """Inner cross-validation of the top-level head on held-out sub-ensemble predictions.

    Returns
    -------
    dict
        ``predictions`` (one per row), ``folds`` (inner fold per row), ``calibrated_halfwidth``
        (per row: the conformal half-width from the other inner folds' residuals).
    """
    X = np.asarray(X, dtype=float)
    ages = np.asarray(ages, dtype=float)
    n_folds = max(2, min(n_folds, len(set(groups))))
    fold = grouped_folds(groups, ages, n_folds, seed)
    pred = np.empty(len(ages))
    half = np.empty(len(ages))
    for f in range(n_folds):
        test, train = fold == f, fold != f
        if not test.any():
            continue
        coef, intercept = fit_ridge(X[train], ages[train], alpha)
        pred[test] = X[test] @ coef + intercept
        inner = X[train] @ coef + intercept
        half[test] = conformal_halfwidth(ages[train] - inner, level)
    return {"predictions": pred, "folds": fold, "calibrated_halfwidth": half}


def _predict_members(family, cache: InputCache, records: Sequence[ScanRecord], checkpoint: Path,
                     device: torch.device) -> list[float]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = family.build_network()
    net.load_state_dict(state["model"])
    net.to(device)
    return [float(np.mean(p)) for p in predict_views(net, [cache.views(r.key) for r in records], device)]


def export_mlens(family, config, records: Sequence[ScanRecord], splits: Mapping[str, Any],
                 fold_results: Mapping[int, Mapping[str, Any]], work_dir: Path, device: torch.device,
                 *, caches: Mapping[str, InputCache], ridge: Mapping[str, Any] | None = None,
                 wall_seconds: float | None = None) -> Path:
    """Fit heads and top level, evaluate every level, write weights and the model card.

    Parameters
    ----------
    family : training.families.MLensFamily
    config : TrainConfig
    records : sequence of ScanRecord
        The usable scans.
    splits : mapping
    fold_results : mapping
        ``{fold: {member name: evaluation}}`` of :func:`training.export.evaluate_fold`.
    work_dir : Path
    device : torch.device
    caches : mapping
        Input cache of each member.
    ridge : mapping, optional
        :func:`training.export.ridge_cross_validation` on the same folds: the baseline the
        ensemble must beat.
    wall_seconds : float, optional

    Returns
    -------
    Path
        The model card ``<models_dir>/<model id>/model_card.json``.
    """
    from .export import (_data_summary, _fold_seconds, card_header, to_fp16, training_record,
                     write_card)
    from .run import member_fold_dir

    exp = config.export
    model_id = exp.model_id
    folder = exp.models_dir / model_id
    folder.mkdir(parents=True, exist_ok=True)
    subs = family.subensembles
    n_base = family.n_base
    alpha = family.head_alpha
    level = 0.95
    by_key = {r.key: r for r in records}
    folds = sorted(fold_results)

    weights, heads, rows, train_seconds = [], [], [], 0.0
    for k in folds:
        part = {name: set(splits["folds"][k][name]) for name in ("val", "test")}
        val = [r for r in records if r.participant in part["val"]]
        test_keys = [row["key"] for row in fold_results[k][family.member_name(subs[0], 0)]["rows"]]
        test = [by_key[key] for key in test_keys]
        base_val = np.zeros((len(subs), n_base, len(val)))
        base_test = np.zeros((len(subs), n_base, len(test)))
        fold_heads = []
        for s, sub in enumerate(subs):
            for b in range(n_base):
                name = family.member_name(sub, b)
                member_dir = member_fold_dir(work_dir, name, k)
                result = fold_results[k][name]
                if [row["key"] for row in result["rows"]] != test_keys:
                    raise RuntimeError(f"fold {k}: member {name} was evaluated on other scans")
                base_test[s, b] = [row["predicted"] for row in result["rows"]]
                cached = member_dir / "val_predictions.json"
                if cached.is_file():
                    stored = json.loads(cached.read_text(encoding="utf-8"))
                else:
                    stored = {}
                if sorted(stored) != sorted(r.key for r in val):
                    preds = _predict_members(family.base_family(sub), caches[name], val,
                                             member_dir / "checkpoint_best.pt", device)
                    stored = dict(zip((r.key for r in val), preds))
                    cached.write_text(json.dumps(stored, indent=1), encoding="utf-8")
                base_val[s, b] = [stored[r.key] for r in val]
                weights.append(_export_weights(folder, k, sub, b, member_dir, result, exp,
                                               to_fp16))
                train_seconds += _fold_seconds(member_dir)
            coef, intercept = fit_ridge(base_val[s].T, [r.age for r in val], alpha)
            fold_heads.append({"coef": coef.tolist(), "intercept": intercept, "n_val": len(val)})
        heads.append(fold_heads)
        for i, record in enumerate(test):
            sub_pred = [float(base_test[s, :, i] @ np.asarray(fold_heads[s]["coef"])
                              + fold_heads[s]["intercept"]) for s in range(len(subs))]
            rows.append({"key": record.key, "participant": record.participant, "fold": k,
                         "age": record.age, "sex": record.sex, "base": base_test[:, :, i].tolist(),
                         "subensembles": sub_pred})

    ages = np.array([r["age"] for r in rows])
    sub_matrix = np.array([r["subensembles"] for r in rows])
    top_cv = top_level_cross_validation(sub_matrix, ages, [r["participant"] for r in rows],
                                        alpha=alpha, n_folds=family.top_folds, seed=config.seed,
                                        level=level)
    top_coef, top_intercept = fit_ridge(sub_matrix, ages, alpha)
    mlens_pred = top_cv["predictions"]
    coverage, widths, calibrated_cov = [], [], []
    for i, row in enumerate(rows):
        lower, upper = mlens_interval(float(mlens_pred[i]), np.asarray(row["base"]),
                                      np.asarray(row["subensembles"]), level)
        row.update(mlens=float(mlens_pred[i]), lower=lower, upper=upper,
                   calibrated_halfwidth=float(top_cv["calibrated_halfwidth"][i]))
        coverage.append(lower <= row["age"] <= upper)
        widths.append(upper - lower)
        calibrated_cov.append(abs(row["age"] - mlens_pred[i]) <= top_cv["calibrated_halfwidth"][i])
    calibrated = conformal_halfwidth(ages - mlens_pred, level)
    levels = _level_metrics(rows, subs, n_base)
    beats = levels["mlens"]["mae"] < min(v["mae_min"] for v in levels["base"].values())
    _write_table(folder / "cv_predictions.tsv", rows, subs, n_base)
    (folder / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")

    params = family.model_params
    card = {
        **card_header(config, family, weights),
        "ensemble": {
            "type": family.ensemble_type, "folds": folds, "base_models": n_base,
            "subensembles": [family.subensemble_card(sub) for sub in subs],
            "heads": heads, "head_alpha": alpha,
            "top": {"coef": top_coef.tolist(), "intercept": top_intercept, "alpha": alpha,
                    "fitted_on": "held-out sub-ensemble predictions of all folds"},
            "interval": {"method": params.get("interval", "ensemble"), "level": level,
                         "calibrated_halfwidth": calibrated}},
        "prediction": {
            "ensemble": ("per fold: base models -> ridge head per sub-ensemble (fitted on that "
                         "fold's validation scans); sub-ensemble predictions averaged over folds "
                         "-> top-level ridge head"),
            "interval": ("'ensemble': MLens prediction +/- t(0.975, n-1) * SD * sqrt(1 + 1/n) of "
                         "the sub-ensemble predictions (two or more sub-ensembles) or of the base "
                         "models of the one sub-ensemble, averaged over the fold ensembles; it "
                         "measures disagreement between members, not the error against age. "
                         "'calibrated': MLens prediction +/- the split-conformal 95% quantile of "
                         "the CV absolute errors."),
            "interval_level": level},
        "training_data": _data_summary(config, records),
        "split": {"unit": "participant", "folds": len(splits["folds"]),
                  "scheme": (f"age-stratified {len(splits['folds'])}-fold; per fold "
                             f"{config.data.val_fraction:.0%} of participants for validation "
                             "(best epoch of each base model, ridge heads), test part = held-out "
                             f"fold; top-level head: inner {family.top_folds}-fold CV over the "
                             "pooled held-out predictions"),
                  "file": "splits.json", "seed": config.seed},
        "metrics": {
            "cross_validation": {
                "pooled": regression_metrics(ages, mlens_pred),
                "levels": levels,
                "ensemble_beats_best_base_model": bool(beats),
                "interval": {
                    "ensemble": {"coverage": float(np.mean(coverage)),
                                 "mean_width": float(np.mean(widths))},
                    "calibrated": {"coverage": float(np.mean(calibrated_cov)),
                                   "mean_width": float(2 * np.mean(top_cv["calibrated_halfwidth"])),
                                   "shipped_halfwidth": calibrated}},
                "predictions": "cv_predictions.tsv"},
            "ridge_baseline": ({"pooled": ridge["pooled"], "per_fold": ridge["per_fold"],
                                "features": ridge["features"]} if ridge else None)},
        "training": {**training_record(config, device, train_seconds, wall_seconds),
                     "stalled_restarts": [{"fold": k, "member": name, **restart}
                                          for k in folds for name, result in fold_results[k].items()
                                          for restart in result.get("stalled_restarts", [])]},
        "fine_tuned_from": None,
        "notes": exp.notes,
    }
    card_path = write_card(card, exp.models_dir)
    LOGGER.info("wrote %s (CV MAE: MLens %.2f y, best base model %.2f y)", card_path,
                levels["mlens"]["mae"], min(v["mae_min"] for v in levels["base"].values()))
    return card_path


def _export_weights(folder: Path, fold: int, sub: str, b: int, member_dir: Path,
                    result: Mapping[str, Any], exp, to_fp16) -> dict[str, Any]:
    """Write one base network as ``<folder>/<sub-ensemble>_base{b}_fold{k}.pt`` (next to the card)."""
    state = torch.load(member_dir / "checkpoint_best.pt", map_location="cpu", weights_only=True)["model"]
    half = exp.fp16 == "always" or (
        exp.fp16 == "auto" and result["fp16_max_change_years"] < exp.fp16_tolerance_years)
    target = folder / f"{sub}_base{b:02d}_fold{fold}.pt"
    tmp = target.with_suffix(".part")
    torch.save(to_fp16(state) if half else state, tmp)
    tmp.replace(target)
    return {"fold": fold, "subensemble": sub, "member": b,
            "file": target.name, "sha256": sha256_file(target),
            "dtype": "float16" if half else "float32", "bytes": target.stat().st_size,
            "fp16_max_change_years": result["fp16_max_change_years"],
            "best_epoch": result["best_epoch"], "best_val_mae": result["best_val_mae"]}


def _level_metrics(rows: Sequence[Mapping[str, Any]], subs: Sequence[str], n_base: int) -> dict[str, Any]:
    """CV metrics per level: every base-model index (pooled over folds), sub-ensembles, MLens."""
    ages = np.array([r["age"] for r in rows])
    base = np.array([r["base"] for r in rows])           # (n, S, B)
    sub = np.array([r["subensembles"] for r in rows])    # (n, S)
    out: dict[str, Any] = {"base": {}, "subensemble": {}}
    for s, name in enumerate(subs):
        maes = [float(np.mean(np.abs(base[:, s, b] - ages))) for b in range(n_base)]
        out["base"][name] = {"mae_mean": float(np.mean(maes)),
                             "mae_sd": float(np.std(maes, ddof=1)) if n_base > 1 else 0.0,
                             "mae_min": float(np.min(maes)), "mae_max": float(np.max(maes)),
                             "mae_per_model": maes}
        out["subensemble"][name] = {
            **regression_metrics(ages, sub[:, s]),
            "mae_mean_of_base_models": float(np.mean(np.abs(base[:, s].mean(axis=1) - ages)))}
    out["mlens"] = regression_metrics(ages, [r["mlens"] for r in rows])
    return out


def _write_table(path: Path, rows: Sequence[Mapping[str, Any]], subs: Sequence[str], n_base: int) -> None:
    header = ["key", "participant", "fold", "age", "sex", "mlens", "lower", "upper",
              *(f"sub_{s}" for s in subs),
              *(f"base_{s}_{b:02d}" for s in subs for b in range(n_base))]
    lines = ["\t".join(header)]
    for r in sorted(rows, key=lambda r: r["key"]):
        values = [r["key"], r["participant"], r["fold"], f"{r['age']:.2f}", r["sex"] or "n/a",
                  f"{r['mlens']:.3f}", f"{r['lower']:.3f}", f"{r['upper']:.3f}",
                  *(f"{v:.3f}" for v in r["subensembles"]),
                  *(f"{r['base'][s][b]:.3f}" for s in range(len(subs)) for b in range(n_base))]
        lines.append("\t".join(str(v) for v in values))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
