"""Prediction with the shipped densenet-clinical ensemble (seed 004), and its relevance map.

The model card ``densenet-clinical/model_card.json`` gives the architecture, the input
preparation and the fold weights (sha256-checked).  A scan's prediction is the mean over the
fold models of each model's mean over the input views (the synthetic slicing offsets of a 3D
scan, or the one view of a real thick-slice scan); the interval comes from the spread of the
fold models.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import ModelError
from ..transforms import ClinicalInputSpec, Volume, load_skull_stripped, prepare_views
from .registry import require_family
from .weights import load_card_state_dicts, network_with_state

__all__ = ["MODEL_ID", "DenseNetClinicalPrediction", "DenseNetClinicalPredictor",
           "predict_densenet_clinical", "fold_interval"]

LOGGER = logging.getLogger("brainage.inference")
MODEL_ID = "densenet-clinical"


def fold_interval(predictions: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the fold predictions and the interval ``mean ± t * SD * sqrt(1 + 1/K)``.

    This is a prediction interval for one more model trained like the folds: it measures
    how much the fold models disagree, not the error against chronological age.

    Examples
    --------
    >>> mean, lo, hi = fold_interval([40.0, 42.0, 41.0, 43.0, 39.0])
    >>> mean, round(lo, 2), round(hi, 2)
    (41.0, 36.19, 45.81)
    """
    from scipy import stats

    values = np.asarray(predictions, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("predictions must be a non-empty 1D sequence")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = (stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1)
            * math.sqrt(1 + 1 / values.size))
    return mean, mean - float(half), mean + float(half)


@dataclass(frozen=True)
class DenseNetClinicalPrediction:
    """Result for one T1w.

    Attributes
    ----------
    brain_age, lower, upper : float
        Ensemble mean and 95 % interval (years).
    fold_predictions : tuple of float
        Each fold model's prediction.
    n_views : int
        Input views averaged (slicing offsets; 1 for a real thick-slice scan).
    thick_slice : bool
        The scan was treated as a real thick-slice acquisition (no synthetic slicing).
    """

    brain_age: float
    lower: float
    upper: float
    fold_predictions: tuple[float, ...]
    n_views: int
    thick_slice: bool


class DenseNetClinicalPredictor:
    """The fold models of a densenet-clinical card, ready to predict.

    Parameters
    ----------
    card : mapping
        Parsed model card.
    folder : path
        Folder the card's weight paths are relative to.
    device : str
        Torch device.
    """

    def __init__(self, card: Mapping[str, Any], folder: str | Path, device: str = "cpu") -> None:
        from ..nets import DenseNetRegressor

        require_family(card, MODEL_ID)
        self.card = dict(card)
        self.device = torch.device(device)
        try:
            self.spec = ClinicalInputSpec.from_dict(card["input"]["params"])
            params = dict(card["architecture"]["params"])
            if "block_config" in params:
                params["block_config"] = tuple(params["block_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card {card.get('id')} is incomplete or invalid: {exc}") from exc
        self.networks = [network_with_state(DenseNetRegressor(**params), state, self.device,
                                            f"weights of {card.get('id')}")
                         for state in load_card_state_dicts(card, folder)]

    @classmethod
    def from_models_dir(cls, models_dir: str | Path | None = None,
                        device: str = "cpu") -> "DenseNetClinicalPredictor":
        """Load ``<models_dir>/densenet-clinical/model_card.json`` (default: the registry's)."""
        from .registry import read_card

        card, folder = read_card(MODEL_ID, models_dir)
        return cls(card, folder, device=device)

    def prepare(self, t1w: str | Path, mask: str | Path) -> tuple[Volume, list[Volume]]:
        """Skull-stripped T1w and its network input views."""
        volume = load_skull_stripped(t1w, mask)
        return volume, prepare_views(volume, self.spec)

    @torch.no_grad()
    def predict_views(self, views: Sequence[Volume | np.ndarray]) -> list[float]:
        """Each fold model's mean prediction over ``views``."""
        data = [v.data if isinstance(v, Volume) else v for v in views]
        x = torch.from_numpy(np.stack(data).astype(np.float32))[:, None].to(self.device)
        return [float(net(x).float().mean()) for net in self.networks]

    def predict(self, t1w: str | Path, mask: str | Path) -> DenseNetClinicalPrediction:
        """Brain age of one participant-level T1w (``desc-preproc_T1w`` + ``desc-brain_mask``)."""
        _, views = self.prepare(t1w, mask)
        return self.predict_prepared(views)

    def predict_prepared(self, views: Sequence[Volume]) -> DenseNetClinicalPrediction:
        """Prediction from views made by :meth:`prepare`."""
        folds = self.predict_views(views)
        mean, lower, upper = fold_interval(folds)
        thick = len(views) == 1 and not any(name == "ThickSliceSimulation"
                                            for name, _ in views[0].history)
        return DenseNetClinicalPrediction(brain_age=mean, lower=lower, upper=upper,
                                          fold_predictions=tuple(folds), n_views=len(views),
                                          thick_slice=thick)

    def relevance_map(self, volume: Volume, views: Sequence[Volume]) -> Volume:
        """Guided-backpropagation magnitude on the grid of ``volume``.

        ``|gradient|`` of every fold model for every view, each mapped back to the input
        grid through the view's affine, then averaged (units: years per unit of normalised
        intensity).
        """
        from ..explain import guided_backprop, map_to_grid

        # sum in each view grid first (views often share one), then resample once per grid:
        # resampling to the native grid costs far more than a backward pass
        on_grid: list[tuple[np.ndarray, np.ndarray]] = []
        for view in views:
            grad = sum(np.abs(guided_backprop(net, view.data, device=self.device))
                       for net in self.networks)
            for affine, acc in on_grid:
                if np.allclose(affine, view.affine) and acc.shape == grad.shape:
                    acc += grad
                    break
            else:
                on_grid.append((np.asarray(view.affine), grad.astype(np.float32)))
        total = np.zeros(volume.shape, dtype=np.float32)
        for affine, acc in on_grid:
            total += map_to_grid(acc, affine, volume.shape, volume.affine)
        total /= len(self.networks) * len(views)
        total[volume.data == 0] = 0.0  # background carries no anatomy
        return volume.with_data(total, record=("GuidedBackprop", {"model": MODEL_ID}))

    def relevance_image(self, volume: Volume, views: Sequence[Volume], like: str | Path):
        """:meth:`relevance_map` as a NIfTI in the voxel order of the file ``like`` (the T1w)."""
        import nibabel as nib

        img = self.relevance_map(volume, views).to_nifti()
        original = nib.load(str(like))
        # the pipeline works in RAS; give the map back the T1w file's own axis order
        return img.as_reoriented(nib.orientations.ornt_transform(
            nib.orientations.io_orientation(img.affine),
            nib.orientations.io_orientation(original.affine)))


def predict_densenet_clinical(t1w: str | Path, mask: str | Path, *,
                              models_dir: str | Path | None = None, device: str = "cpu",
                              relevance_file: str | Path | None = None) -> DenseNetClinicalPrediction:
    """Predict brain age of one T1w with the shipped ensemble (optionally write the relevance map).

    Parameters
    ----------
    t1w, mask : path
        Participant-level ``desc-preproc_T1w`` and ``desc-brain_mask``.
    models_dir : path, optional
        Models folder with ``densenet-clinical/model_card.json`` (default: the installed models).
    device : str
    relevance_file : path, optional
        Write the guided-backpropagation map (T1w grid, NIfTI) here.

    Returns
    -------
    DenseNetClinicalPrediction
    """
    predictor = DenseNetClinicalPredictor.from_models_dir(models_dir, device=device)
    volume, views = predictor.prepare(t1w, mask)
    result = predictor.predict_prepared(views)
    if relevance_file is not None:
        Path(relevance_file).parent.mkdir(parents=True, exist_ok=True)
        predictor.relevance_image(volume, views, like=t1w).to_filename(str(relevance_file))
    return result
