"""Ridge regression on the same inputs as the network: the baseline a model must beat."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["RidgeBaseline"]


class RidgeBaseline:
    """Kernel (dual) ridge regression on flattened input volumes, ``alpha`` by leave-one-out.

    With far fewer scans than voxels, the dual form needs only the ``n x n`` Gram matrix; the
    leave-one-out residuals of every candidate ``alpha`` follow in closed form from its
    eigendecomposition, so choosing ``alpha`` costs no refits.

    Parameters
    ----------
    alphas : sequence of float, optional
        Candidates, relative to the mean eigenvalue of the Gram matrix (default 1e-4 … 1e3).

    Attributes
    ----------
    alpha_ : float
        Selected (absolute) regularisation.
    """

    def __init__(self, alphas: Sequence[float] | None = None) -> None:
        self.alphas = tuple(float(a) for a in (alphas if alphas is not None
                                               else np.logspace(-4, 3, 29)))
        if not self.alphas or min(self.alphas) <= 0:
            raise ValueError(f"alphas must be positive numbers, got {self.alphas!r}")

    def fit(self, X: np.ndarray, y: Sequence[float]) -> "RidgeBaseline":
        """Fit on ``X`` (n, p) and targets ``y`` (n,)."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < 3:
            raise ValueError(f"X must be (n >= 3, p) and y (n,), got {X.shape} and {y.shape}")
        self.x_mean_ = X.mean(axis=0)
        self.y_mean_ = float(y.mean())
        Xc = X - self.x_mean_
        yc = y - self.y_mean_
        gram = Xc @ Xc.T
        evals, evecs = np.linalg.eigh(gram)
        evals = np.clip(evals, 0, None)
        uty = evecs.T @ yc
        scale = float(evals.mean()) or 1.0
        best = (np.inf, None)
        n = len(y)
        for rel in self.alphas:
            alpha = rel * scale
            shrink = evals / (evals + alpha)
            fitted = evecs @ (shrink * uty)
            # hat-matrix diagonal, plus 1/n for the fitted intercept
            hat = np.einsum("ij,j,ij->i", evecs, shrink, evecs) + 1.0 / n
            loo = (yc - fitted) / np.clip(1 - hat, 1e-9, None)
            err = float(np.mean(loo ** 2))
            if err < best[0]:
                best = (err, alpha)
        self.alpha_ = float(best[1])
        self.loo_mse_ = float(best[0])
        dual = evecs @ (uty / (evals + self.alpha_))
        self.coef_ = Xc.T @ dual
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted targets for ``X`` (m, p)."""
        X = np.asarray(X, dtype=np.float64)
        return (X - self.x_mean_) @ self.coef_ + self.y_mean_
