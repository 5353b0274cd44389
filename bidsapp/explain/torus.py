"""Simulated ageing tori: the check seed 002 (Hofmann et al.) ran on LRP for regression.

A 2D "head" is a torus (annulus) on a black background, with a textured body at T1w-like
intensities.  It ages in two ways whose locations are known exactly:

* **atrophy** — the outer border moves inwards and the inner border outwards, linearly with
  age (from 20 on) plus normally distributed individual variation (cortical atrophy and
  enlarging CSF spaces);
* **lesions** — small hyperintense discs inside the body, none before 40 and then a number
  growing linearly with age, again with normally distributed variation (white-matter lesions).

A small ensemble of 2D versions of the MLens base model (:class:`~bidsapp.nets.MLensCNN`,
``spatial_dims=2``, ReLU) trained on such tori predicts age; their LRP maps
(:mod:`bidsapp.explain.lrp`), averaged over the base models as the paper averages the maps of an
ensemble, must then put relevance on the lesions and the atrophied borders, and sum to
prediction minus output bias.  (A single briefly trained model depends on its initialisation:
over six seeds, one leaned on the borders and gave lesions only 2.6 times the torus average;
the average of three models did not fall below 3.9 in the seeds tried.)
This module is the documented example; ``tests/explain/test_lrp_torus.py`` runs it.

Example
-------
>>> import torch
>>> torch.set_num_threads(1)
>>> nets = train_torus_ensemble(simulate_tori(2400, seed=0))   # doctest: +SKIP
>>> torus_lrp_metrics(nets, simulate_tori(200, seed=1))         # doctest: +SKIP
{'mae': ..., 'lesion_ratio': ..., 'border_ratio': ..., ...}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

__all__ = ["TorusAgeing", "ToriData", "simulate_torus", "simulate_tori", "train_torus_model",
           "train_torus_ensemble", "torus_lrp_metrics"]

#: Image intensities on a 0-1 scale (body, lesions); images are returned in 0-255, the range
#: of the MRI inputs (uint8 values, see :mod:`bidsapp.transforms.mni_pruned`).
_BODY, _LESION = 0.55, 1.0


@dataclass(frozen=True)
class TorusAgeing:
    """How a torus ages (all effects in fractions of the image side or in counts).

    Attributes
    ----------
    outer_shrink, inner_growth : float
        Border movement at full atrophy (age 80), as a fraction of the image side.
    atrophy_sd : float
        Individual variation of the atrophy amount (1 = the 20-to-80 change).
    lesion_onset : float
        Age (years) from which lesions accumulate.
    lesion_rate : float
        Expected lesions per year after the onset.
    lesion_sd : float
        Individual variation of the lesion count.
    lesion_radius : (float, float)
        Range of lesion radii (pixels).
    """

    outer_shrink: float = 0.08
    inner_growth: float = 0.06
    atrophy_sd: float = 0.08
    lesion_onset: float = 40.0
    lesion_rate: float = 0.12
    lesion_sd: float = 0.7
    lesion_radius: tuple[float, float] = (1.0, 1.8)


@dataclass(frozen=True)
class ToriData:
    """A set of simulated tori.

    Attributes
    ----------
    images : ndarray, shape (n, size, size), float32 in [0, 255] (integer values, as uint8)
    ages : ndarray, shape (n,)
    torus : ndarray of bool, shape (n, size, size)
        Pixels of the (aged) torus body, lesions included.
    lesions : ndarray of bool, shape (n, size, size)
    atrophy : ndarray of bool, shape (n, size, size)
        Pixels of the young (age 20) torus lost to atrophy.
    """

    images: np.ndarray
    ages: np.ndarray
    torus: np.ndarray
    lesions: np.ndarray
    atrophy: np.ndarray


def simulate_torus(age: float, rng: np.random.Generator, size: int = 48,
                   ageing: TorusAgeing = TorusAgeing()) -> tuple[np.ndarray, ...]:
    """One torus of ``age`` years.

    Parameters
    ----------
    age : float
        Age in years (20-80 is the simulated range).
    rng : numpy.random.Generator
    size : int
        Side of the square image (pixels).
    ageing : TorusAgeing

    Returns
    -------
    image, torus, lesions, atrophy : ndarray
        See :class:`ToriData` (one sample).
    """
    if size < 24:
        raise ValueError(f"size must be >= 24 pixels, got {size}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = (size - 1) / 2 + rng.normal(0, 1.0, 2)
    radius = np.hypot(yy - centre[0], xx - centre[1])
    outer0, inner0 = 0.42 * size, 0.15 * size
    # atrophy: linear in age with individual variation (clipped so a body always remains)
    amount = float(np.clip((age - 20.0) / 60.0 + rng.normal(0, ageing.atrophy_sd), 0.0, 1.3))
    outer = outer0 - ageing.outer_shrink * size * amount
    inner = inner0 + ageing.inner_growth * size * amount
    young = (radius <= outer0) & (radius >= inner0)
    torus = (radius <= outer) & (radius >= inner)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 2.0)
    texture *= 0.05 / max(float(texture.std()), 1e-6)
    image = np.where(torus, _BODY + texture + rng.normal(0, 0.02, (size, size)), 0.0)
    # lesions: none before the onset, then linear in age with individual variation
    excess = age - ageing.lesion_onset
    n_lesions = (int(max(0, round(ageing.lesion_rate * excess + rng.normal(0, ageing.lesion_sd))))
                 if excess > 0 else 0)
    lesions = np.zeros((size, size), dtype=bool)
    for _ in range(n_lesions):
        r = rng.uniform(inner + 2.0, outer - 2.0)
        angle = rng.uniform(0, 2 * np.pi)
        cy, cx = centre[0] + r * np.sin(angle), centre[1] + r * np.cos(angle)
        lesions |= np.hypot(yy - cy, xx - cx) <= rng.uniform(*ageing.lesion_radius)
    lesions &= torus
    image[lesions] = _LESION + rng.normal(0, 0.02, int(lesions.sum()))
    image = np.rint(np.clip(image, 0, 1) * 255).astype(np.float32)
    return image, torus, lesions, young & ~torus


def simulate_tori(n: int, *, size: int = 48, seed: int = 0,
                  age_range: tuple[float, float] = (20.0, 80.0),
                  ageing: TorusAgeing = TorusAgeing()) -> ToriData:
    """``n`` tori with ages drawn uniformly from ``age_range``.

    Parameters
    ----------
    n : int
    size : int
    seed : int
    age_range : (float, float)
    ageing : TorusAgeing

    Returns
    -------
    ToriData
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    ages = rng.uniform(*age_range, n)
    samples = [simulate_torus(float(a), rng, size, ageing) for a in ages]
    images, torus, lesions, atrophy = (np.stack(parts) for parts in zip(*samples))
    return ToriData(images, ages, torus, lesions, atrophy)


def train_torus_model(data: ToriData, *, epochs: int = 12, batch_size: int = 16, lr: float = 5e-4,
                      seed: int = 0) -> torch.nn.Module:
    """Train the 2D MLens base model (ReLU, as the paper's LRP models) on simulated tori.

    Adam (5e-4) on the MSE, output bias initialised to the mean training age, as the paper.

    Parameters
    ----------
    data : ToriData
        Training tori.
    epochs, batch_size : int
    lr : float
    seed : int
        Seeds initialisation and shuffling.

    Returns
    -------
    MLensCNN
        In eval mode.
    """
    from ..nets import MLENS_RELU, MLensCNN

    torch.manual_seed(seed)
    size = data.images.shape[1:]
    net = MLensCNN(spatial_dims=2, in_shape=size, act=MLENS_RELU,
                   output_bias=float(np.mean(data.ages)))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    x_all = torch.from_numpy(data.images)[:, None]
    y_all = torch.from_numpy(data.ages.astype(np.float32))[:, None]
    order_rng = np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        order = torch.from_numpy(order_rng.permutation(len(y_all)))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.mean((net(x_all[idx]) - y_all[idx]) ** 2)
            loss.backward()
            optimizer.step()
    return net.eval()


def train_torus_ensemble(data: ToriData, *, n_models: int = 3, epochs: int = 8,
                         batch_size: int = 16, lr: float = 5e-4, seed: int = 0) -> list[torch.nn.Module]:
    """Train ``n_models`` torus models, each on its own share of ``data`` (seeds ``seed + i``).

    Returns
    -------
    list of MLensCNN
        In eval mode.
    """
    if n_models < 1 or len(data.ages) < n_models:
        raise ValueError(f"need n_models >= 1 and at least one torus each, got {n_models}, "
                         f"{len(data.ages)}")
    shares = np.array_split(np.arange(len(data.ages)), n_models)
    return [train_torus_model(ToriData(*(a[idx] for a in (data.images, data.ages, data.torus,
                                                          data.lesions, data.atrophy))),
                              epochs=epochs, batch_size=batch_size, lr=lr, seed=seed + i)
            for i, idx in enumerate(shares)]


def _border(torus: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of a torus edge, on either side (a 2-pixel band)."""
    return ndimage.binary_dilation(torus) & ~ndimage.binary_erosion(torus)


def torus_lrp_metrics(networks, data: ToriData, *, min_evidence: float = 1.0,
                      young_max: float = 35.0, old_min: float = 60.0) -> dict[str, float]:
    """Prediction error and where LRP puts relevance on held-out tori.

    Parameters
    ----------
    networks : nn.Module or sequence of nn.Module
        Trained 2D models (:func:`train_torus_ensemble`); predictions and relevance maps are
        averaged over them.
    data : ToriData
        Held-out tori.
    min_evidence : float
        Conservation is checked relative to ``|prediction - bias|`` where that is at least
        this many years, and as an absolute error (years) below it.
    young_max, old_min : float
        Ages of the "young" and "old" tori whose borders are compared.

    Returns
    -------
    dict
        ``mae`` (years, of the mean prediction);
        ``lesion_ratio``: mean ``|relevance|`` per lesion pixel over the mean per torus pixel
        (pooled over the tori with lesions);
        ``border_ratio``: the same for the 2-pixel band around the (aged) torus edges, over
        the mean per interior torus pixel (no border, no lesion);
        ``atrophy_ratio``: the same for the pixels lost to atrophy (now background);
        ``border_signed_young`` / ``border_signed_old``: mean signed relevance per border pixel
        of young / old tori (intact borders speak for a younger, atrophied ones for an older
        age than the bias);
        ``conservation_max_rel_error``: largest
        ``|sum(relevance) - (prediction - bias)| / max(|prediction - bias|, min_evidence)`` over
        tori and models;
        ``n_with_lesions``.
    """
    from .lrp import lrp_relevance

    networks = [networks] if isinstance(networks, torch.nn.Module) else list(networks)
    relevance, prediction, worst = 0.0, 0.0, 0.0
    for net in networks:
        rel, pred, bias = lrp_relevance(net, data.images[:, None])
        evidence = pred - bias[0]
        error = np.abs(rel.reshape(len(evidence), -1).sum(axis=1) - evidence)
        worst = max(worst, float(np.max(error / np.maximum(np.abs(evidence), min_evidence))))
        relevance = relevance + rel / len(networks)
        prediction = prediction + pred / len(networks)
    magnitude = np.abs(relevance)
    border = np.stack([_border(t) for t in data.torus])
    interior = data.torus & ~border & ~data.lesions
    has_lesions = data.lesions.any(axis=(1, 2))
    young, old = data.ages <= young_max, data.ages >= old_min

    def ratio(where: np.ndarray, reference: np.ndarray, rows: np.ndarray) -> float:
        if not rows.any() or not where[rows].any():
            return float("nan")
        return float(magnitude[rows][where[rows]].mean() / magnitude[rows][reference[rows]].mean())

    everyone = np.ones(len(data.ages), dtype=bool)
    return {"mae": float(np.mean(np.abs(prediction - data.ages))),
            "lesion_ratio": ratio(data.lesions, data.torus, has_lesions),
            "border_ratio": ratio(border, interior, everyone),
            "atrophy_ratio": ratio(data.atrophy, data.torus, data.atrophy.any(axis=(1, 2))),
            "border_signed_young": float(relevance[young][border[young]].mean()) if young.any() else float("nan"),
            "border_signed_old": float(relevance[old][border[old]].mean()) if old.any() else float("nan"),
            "conservation_max_rel_error": worst,
            "n_with_lesions": int(has_lesions.sum())}
