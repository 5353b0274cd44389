"""Metrics and batched prediction shared by validation, cross-validation and export."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["regression_metrics", "predict_views"]


def regression_metrics(age: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
    """Brain-age metrics: MAE, Pearson r, R² (against age), PAD–age slope, mean PAD, n.

    The PAD–age slope is the least-squares slope of ``predicted - age`` on ``age``: 0 for an
    unbiased model, negative for the usual regression to the mean.

    Examples
    --------
    >>> m = regression_metrics([20, 40, 60], [22, 40, 58])
    >>> m["mae"], round(m["pad_age_slope"], 3)
    (1.3333333333333333, -0.1)
    """
    age = np.asarray(age, dtype=float)
    pred = np.asarray(predicted, dtype=float)
    if age.shape != pred.shape or age.ndim != 1:
        raise ValueError(f"age and predicted must be 1D of equal length, got {age.shape}, {pred.shape}")
    if age.size < 2:
        raise ValueError("need at least two predictions for metrics")
    pad = pred - age
    ss_tot = float(np.sum((age - age.mean()) ** 2))
    out = {"n": int(age.size), "mae": float(np.mean(np.abs(pad))),
           "rmse": float(math.sqrt(np.mean(pad ** 2))), "mean_pad": float(pad.mean()),
           "r2": float(1 - np.sum(pad ** 2) / ss_tot) if ss_tot > 0 else float("nan")}
    if np.std(pred) > 0 and np.std(age) > 0:
        out["r"] = float(np.corrcoef(age, pred)[0, 1])
    else:
        out["r"] = float("nan")
    out["pad_age_slope"] = float(np.polyfit(age, pad, 1)[0]) if np.std(age) > 0 else float("nan")
    return out


@torch.no_grad()
def predict_views(model: nn.Module, views: Sequence[Sequence[np.ndarray]], device: torch.device,
                  batch_size: int = 4) -> list[list[float]]:
    """Predictions of ``model`` (eval mode) for every view of every scan.

    Parameters
    ----------
    model : nn.Module
        Maps ``(B, 1, X, Y, Z)`` to ``(B, 1)`` years.
    views : sequence of sequence of ndarray
        Per scan, its views.
    device : torch.device
    batch_size : int

    Returns
    -------
    list of list of float
        Same nesting as ``views``.
    """
    was_training = model.training
    model.eval()
    flat = [(i, v) for i, scan in enumerate(views) for v in scan]
    out: list[list[float]] = [[] for _ in views]
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        x = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for _, v in chunk]))
        pred = model(x[:, None].to(device)).float().cpu().numpy()[:, 0]
        for (i, _), p in zip(chunk, pred):
            out[i].append(float(p))
    model.train(was_training)
    return out
