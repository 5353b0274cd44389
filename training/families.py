"""Model families: what the engine needs to know about each seed model.

A family turns its config sections into a network and an input specification, prepares the
network inputs of a scan (one or more *views*, e.g. slicing offsets) and augments one view.
The engine is otherwise family-agnostic; a new family subclasses :class:`ModelFamily` and is
added with :func:`register_family`.
"""

from __future__ import annotations

import abc
import hashlib
import json
from typing import Any, Mapping

import numpy as np
from torch import nn

from bidsapp.errors import UsageError

from .data import ScanRecord

__all__ = ["ModelFamily", "DenseNetClinicalFamily", "register_family", "get_family",
           "available_families"]


class ModelFamily(abc.ABC):
    """Interface of one model family.

    Parameters
    ----------
    model_params : mapping
        The config's ``[model]`` table.
    input_params : mapping
        The config's ``[input]`` table.
    """

    name: str = ""
    seed_paper: str = ""

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        self.model_params = dict(model_params)
        self.input_params = dict(input_params)

    @abc.abstractmethod
    def build_network(self) -> nn.Module:
        """A freshly initialised network."""

    @abc.abstractmethod
    def prepare(self, record: ScanRecord) -> list[np.ndarray]:
        """All input views of one scan (arrays without channel axis)."""

    @abc.abstractmethod
    def prepare_robustness(self, record: ScanRecord, spacing_mm: float) -> list[np.ndarray]:
        """Views of the scan re-acquired with ``spacing_mm`` axial slices."""

    @abc.abstractmethod
    def augment(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One randomly augmented copy of a view."""

    def keep(self, views: list[np.ndarray]) -> bool:
        """Whether a scan is usable for training (e.g. not mostly background)."""
        return True

    def architecture(self) -> dict[str, Any]:
        """Description for the model card (class and constructor arguments)."""
        return {"params": self.model_params}

    def preprocessing(self) -> dict[str, Any]:
        """Description of the input preparation for the model card."""
        return {"params": self.input_params}

    def cache_tag(self) -> str:
        """Changes whenever the prepared inputs would change."""
        text = json.dumps({"family": self.name, "input": self.input_params}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class DenseNetClinicalFamily(ModelFamily):
    """Seed 004 (Kim et al.): 3D DenseNet on synthetic thick-slice T1w."""

    name = "densenet-clinical"
    seed_paper = ("Kim et al., brain age prediction for clinical 2D axial T1-weighted MRI with a "
                  "3D DenseNet-169 trained on sliced research-grade 3D scans (seed 004)")
    _NET_KEYS = {"init_features", "growth_rate", "block_config", "bn_size", "norm",
                 "dropout_prob", "drop_last_transition"}

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        from bidsapp.transforms import ClinicalInputSpec, clinical_augmentation

        super().__init__(model_params, input_params)
        unknown = sorted(set(self.model_params) - self._NET_KEYS)
        if unknown:
            raise UsageError(f"[model] has unknown key(s) {unknown} for densenet-clinical; "
                             f"allowed: {sorted(self._NET_KEYS)}")
        if "block_config" in self.model_params:
            self.model_params["block_config"] = [int(b) for b in self.model_params["block_config"]]
        try:
            self.spec = ClinicalInputSpec.from_dict(self.input_params)
            self.build_network()
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid densenet-clinical [model]/[input]: {exc}") from exc
        self.input_params = self.spec.to_dict()
        self._augment = clinical_augmentation(self.spec)

    def _net_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.model_params)
        if "block_config" in kwargs:
            kwargs["block_config"] = tuple(kwargs["block_config"])
        return kwargs

    def build_network(self) -> nn.Module:
        from bidsapp.nets import DenseNetRegressor

        return DenseNetRegressor(spatial_dims=3, in_channels=1, out_channels=1, **self._net_kwargs())

    def prepare(self, record: ScanRecord) -> list[np.ndarray]:
        from bidsapp.transforms import load_skull_stripped, prepare_views

        volume = load_skull_stripped(record.t1w, record.mask)
        return [view.data for view in prepare_views(volume, self.spec)]

    def prepare_robustness(self, record: ScanRecord, spacing_mm: float) -> list[np.ndarray]:
        from bidsapp.transforms import SimulateThickSlices, load_skull_stripped, prepare_views

        volume = SimulateThickSlices(spacing_mm)(load_skull_stripped(record.t1w, record.mask))
        return [view.data for view in prepare_views(volume, self.spec)]

    def augment(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from bidsapp.transforms import Volume

        return self._augment(Volume(np.asarray(view, dtype=np.float32), np.eye(4)), rng).data

    def keep(self, views: list[np.ndarray]) -> bool:
        return float(np.mean(views[0] == 0)) <= self.spec.max_background_fraction

    def architecture(self) -> dict[str, Any]:
        from bidsapp.nets import DenseNetRegressor

        net = self.build_network()
        params = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                  **{k: v for k, v in self.model_params.items()}}
        return {"class": f"{DenseNetRegressor.__module__}.{DenseNetRegressor.__name__}",
                "params": params, "n_parameters": int(sum(p.numel() for p in net.parameters())),
                "activation": "LeakyReLU(0.01)", "init": "He (Kaiming normal)",
                "output": "target_offset + target_scale * linear(features) (years)"}

    def preprocessing(self) -> dict[str, Any]:
        return {"function": "bidsapp.transforms.clinical.prepare_views",
                "params": self.spec.to_dict(),
                "inputs": ["desc-preproc_T1w (native, N4)", "desc-brain_mask"],
                "description": (
                    "skull-stripped native T1w (RAS); 3D scans are sliced into synthetic axial 2D "
                    "scans (every k-th slice, k*spacing >= slice_gap_mm), one view per offset; "
                    "scans with axial spacing >= thick_slice_threshold_mm are not sliced; "
                    "trilinear interpolation to spacing_mm isotropic on the scan's own axes (no "
                    "registration); z-score on 1st-99th percentile brain voxels, background 0, "
                    "clip at 99.9th percentile; crop/pad to shape around the brain's bounding "
                    "box centre. Prediction = mean over views.")}


_FAMILIES: dict[str, type[ModelFamily]] = {DenseNetClinicalFamily.name: DenseNetClinicalFamily}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Make a family available to configs by its ``name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)) or not cls.name:
        raise TypeError("register_family expects a ModelFamily subclass with a name")
    _FAMILIES[cls.name] = cls
    return cls


def available_families() -> list[str]:
    """Names of the registered families."""
    return sorted(_FAMILIES)


def get_family(name: str, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> ModelFamily:
    """Instantiate the family ``name`` with its config tables.

    Raises
    ------
    UsageError
        For an unknown family.
    """
    if name not in _FAMILIES:
        raise UsageError(f"unknown model family {name!r}; available: {', '.join(available_families())} "
                         "(other seed families register themselves when they are added)")
    return _FAMILIES[name](model_params, input_params)
