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
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from torch import nn

from bidsapp.errors import UsageError

from .data import ScanRecord

__all__ = ["ModelFamily", "Member", "DenseNetClinicalFamily", "MLensBaseFamily", "MLensFamily",
           "LocalUNetFamily", "VGGCBVFamily", "register_family", "get_family",
           "available_families"]


@dataclass(frozen=True)
class Member:
    """One network the engine trains in every fold (an ensemble family has several).

    Attributes
    ----------
    name : str
        Sub-folder of the work directory (``""``: the fold folders themselves, as for a family
        with one network per fold).
    family : ModelFamily
        Builds the member's network and prepares its inputs.
    seed_offset : int
        Added to the config seed for this member's initialisation and shuffling.
    """

    name: str
    family: "ModelFamily"
    seed_offset: int = 0


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
    ensemble: bool = False
    """True for families that train several members per fold and export them with
    :meth:`export_ensemble` (the engine's own export handles one network per fold)."""

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        self.model_params = dict(model_params)
        self.input_params = dict(input_params)

    def members(self) -> list[Member]:
        """The networks trained in every fold (default: this family's one network)."""
        return [Member("", self, 0)]

    def export_ensemble(self, config, records, splits, fold_results, work_dir, device, *,
                        caches, ridge=None, wall_seconds=None):
        """Write weights and model card of an ensemble family (see :class:`MLensFamily`)."""
        raise NotImplementedError(f"{self.name} trains one network per fold; the engine exports it")

    def trainer_class(self):
        """The :class:`~training.trainer.Trainer` (sub)class this family trains with (None: the
        engine's default)."""
        return None

    def evaluate_fold(self, cache, test, best_path, device, robustness_spacings=()):
        """Held-out predictions of one fold (default: :func:`training.export.evaluate_fold`)."""
        from .export import evaluate_fold

        return evaluate_fold(self, cache, test, best_path, device, robustness_spacings)

    def card_extras(self, fold_results) -> dict[str, Any]:
        """Family-specific model-card entries, merged into the engine's card (tables are
        updated key by key)."""
        return {}

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


def mni_t1w_path(record: ScanRecord):
    """The participant-level MNI-space T1w beside a record's native ``desc-preproc_T1w``.

    Raises
    ------
    InputMissingError
        When it is missing (derivatives of an older brainage version).
    """
    from bidsapp.errors import InputMissingError
    from bidsapp.transforms.mni_pruned import MNI_T1W_ENTITIES as E

    path = record.t1w.parent / (f"{record.key}_space-{E['space']}_res-{E['res']}_"
                                f"desc-{E['desc']}_{E['suffix']}.nii.gz")
    if not path.is_file():
        raise InputMissingError(f"{path} is missing: this model family reads the MNI-space T1w "
                                "of `brainage ... participant`; rerun the participant level")
    return path


class MLensBaseFamily(ModelFamily):
    """One MLens base model (seed 002): the 3D CNN on one region's pruned MNI-space T1w.

    Not registered on its own: :class:`MLensFamily` trains many of these per fold.
    """

    name = "mlens-base"
    seed_paper = "Hofmann et al., multi-level ensembles of 3D CNNs with LRP (seed 002)"
    _NET_KEYS = {"filters", "kernel_sizes", "activation", "negative_slope", "pool_size",
                 "pool_stride", "dropout", "dense_units"}

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        from bidsapp.transforms.mni_pruned import MNIPrunedSpec, pruning_box

        super().__init__(model_params, input_params)
        unknown = sorted(set(self.model_params) - self._NET_KEYS)
        if unknown:
            raise UsageError(f"unknown base-model key(s) {unknown}; allowed: {sorted(self._NET_KEYS)}")
        try:
            self.spec = MNIPrunedSpec.from_dict(self.input_params)
            self.box = pruning_box(self.spec)
            self.build_network()
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid mlens [model]/[input]: {exc}") from exc
        self.input_params = self.spec.to_dict()

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """Shape of the pruned input."""
        return tuple(s.stop - s.start for s in self.box)

    def net_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`bidsapp.nets.MLensCNN` (JSON-serialisable)."""
        p = self.model_params
        act = str(p.get("activation", "leakyrelu")).lower()
        if act not in ("leakyrelu", "relu"):
            raise ValueError(f"activation must be 'leakyrelu' or 'relu', got {act!r}")
        act_kwargs = {"inplace": False}
        if act == "leakyrelu":
            act_kwargs["negative_slope"] = float(p.get("negative_slope", 0.2))
        kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                  "in_shape": list(self.in_shape), "act": [act, act_kwargs]}
        for key in ("filters", "kernel_sizes"):
            if key in p:
                kwargs[key] = [int(v) for v in p[key]]
        for key in ("pool_size", "pool_stride", "dense_units"):
            if key in p:
                kwargs[key] = int(p[key])
        if "dropout" in p:
            kwargs["dropout"] = float(p["dropout"])
        return kwargs

    def build_network(self) -> nn.Module:
        from bidsapp.nets import MLensCNN

        kwargs = self.net_kwargs()
        kwargs["act"] = tuple(kwargs["act"])
        return MLensCNN(**kwargs)

    def prepare(self, record: ScanRecord) -> list[np.ndarray]:
        from bidsapp.transforms.mni_pruned import prepare_mni_input, to_network_input

        return [to_network_input(prepare_mni_input(mni_t1w_path(record), self.spec))]

    def prepare_robustness(self, record: ScanRecord, spacing_mm: float) -> list[np.ndarray]:
        raise NotImplementedError("mlens reads the MNI-space T1w; thick-slice robustness needs "
                                  "re-registration (set export.robustness_spacings_mm = [])")

    def augment(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # the paper trains without augmentation
        return np.asarray(view, dtype=np.float32)

    def keep(self, views: list[np.ndarray]) -> bool:
        return bool(np.any(views[0] > 0))


class MLensFamily(ModelFamily):
    """Seed 002 (Hofmann et al.): multi-level ensembles (MLens) of 3D CNN base models.

    ``[model]`` holds the base-model keys of :class:`MLensBaseFamily` plus the ensemble:
    ``ensemble_type`` (``"i"``: one whole-brain sub-ensemble per sequence, 10 base models;
    ``"ii"``: one per sequence x region, 5 base models), ``base_models``, ``regions``,
    ``sequences`` (only ``["T1w"]``: the participant level registers no other sequence),
    ``head_alpha`` (1), ``top_folds`` (5) and ``interval`` (``"ensemble"`` or
    ``"calibrated"``, see :func:`training.ensemble.mlens_interval`).  ``[input]`` holds
    :class:`bidsapp.transforms.mni_pruned.MNIPrunedSpec` keys except ``region``.
    """

    name = "mlens"
    seed_paper = ("Hofmann et al., Towards the interpretability of deep learning models for "
                  "multi-modal neuroimaging: multi-level ensembles (MLens) of 3D CNNs with "
                  "layer-wise relevance propagation (seed 002)")
    ensemble = True
    _ENSEMBLE_KEYS = {"ensemble_type", "base_models", "regions", "sequences", "head_alpha",
                      "top_folds", "interval"}

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        super().__init__(model_params, input_params)
        p = self.model_params
        unknown = sorted(set(p) - self._ENSEMBLE_KEYS - MLensBaseFamily._NET_KEYS)
        if unknown:
            raise UsageError(f"[model] has unknown key(s) {unknown} for mlens; allowed: "
                             f"{sorted(self._ENSEMBLE_KEYS | MLensBaseFamily._NET_KEYS)}")
        if "region" in self.input_params:
            raise UsageError("[input] region is set per sub-ensemble by [model] regions")
        self.ensemble_type = str(p.get("ensemble_type", "i"))
        if self.ensemble_type not in ("i", "ii"):
            raise UsageError(f"model.ensemble_type must be 'i' or 'ii', got {self.ensemble_type!r}")
        sequences = [str(v) for v in p.get("sequences", ["T1w"])]
        if sequences != ["T1w"]:
            raise UsageError(f"model.sequences {sequences}: only ['T1w'] is supported (the "
                             "participant level registers no FLAIR/SWI to MNI space)")
        default_regions = ["whole"] if self.ensemble_type == "i" else ["cortical", "subcortical",
                                                                         "cerebellum"]
        regions = [str(v) for v in p.get("regions", default_regions)]
        if self.ensemble_type == "i" and regions != ["whole"]:
            raise UsageError("model.regions must be ['whole'] for ensemble_type 'i'")
        if not regions or len(set(regions)) != len(regions):
            raise UsageError(f"model.regions must be distinct region names, got {regions}")
        self.n_base = int(p.get("base_models", 10 if self.ensemble_type == "i" else 5))
        if self.n_base < 2:
            raise UsageError(f"model.base_models must be >= 2 (the interval needs a spread), "
                             f"got {self.n_base}")
        self.head_alpha = float(p.get("head_alpha", 1.0))
        self.top_folds = int(p.get("top_folds", 5))
        if self.head_alpha < 0 or self.top_folds < 2:
            raise UsageError("model.head_alpha must be >= 0 and model.top_folds >= 2")
        if str(p.get("interval", "ensemble")) not in ("ensemble", "calibrated"):
            raise UsageError(f"model.interval must be 'ensemble' or 'calibrated', got "
                             f"{p.get('interval')!r}")
        self.subensembles = [f"{seq}-{region}" for seq in sequences for region in regions]
        base_params = {k: v for k, v in p.items() if k in MLensBaseFamily._NET_KEYS}
        self._bases = {f"{seq}-{region}": MLensBaseFamily(base_params,
                                                           {**self.input_params, "region": region})
                       for seq in sequences for region in regions}
        self.input_params = {k: v for k, v in self._bases[self.subensembles[0]].input_params.items()
                             if k != "region"}

    def base_family(self, subensemble: str) -> MLensBaseFamily:
        """The base-model family of one sub-ensemble."""
        return self._bases[subensemble]

    @staticmethod
    def member_name(subensemble: str, index: int) -> str:
        """Work sub-folder of base model ``index`` of ``subensemble``."""
        return f"{subensemble}/base{index:02d}"

    def members(self) -> list[Member]:
        return [Member(self.member_name(sub, b), self._bases[sub], 1 + 100 * s + b)
                for s, sub in enumerate(self.subensembles) for b in range(self.n_base)]

    def build_network(self) -> nn.Module:
        return self._bases[self.subensembles[0]].build_network()

    def prepare(self, record: ScanRecord) -> list[np.ndarray]:
        return self._bases[self.subensembles[0]].prepare(record)

    def prepare_robustness(self, record: ScanRecord, spacing_mm: float) -> list[np.ndarray]:
        return self._bases[self.subensembles[0]].prepare_robustness(record, spacing_mm)

    def augment(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(view, dtype=np.float32)

    def subensemble_card(self, subensemble: str) -> dict[str, Any]:
        """Input and network of one sub-ensemble, for the model card."""
        base = self._bases[subensemble]
        sequence, region = subensemble.split("-", 1)
        return {"name": subensemble, "sequence": sequence, "region": region,
                "input": {**base.spec.to_dict(), "shape": list(base.in_shape),
                          "box": [[s.start, s.stop] for s in base.box]},
                "net_kwargs": base.net_kwargs(),
                "n_parameters": int(sum(q.numel() for q in base.build_network().parameters()))}

    def architecture(self) -> dict[str, Any]:
        from bidsapp.nets import MLensCNN

        return {"class": f"{MLensCNN.__module__}.{MLensCNN.__name__}", "params": self.model_params,
                "description": "5 conv blocks (conv, activation, max-pool 3 stride 2, 'same' "
                               "padding), flatten, dropout, dense, activation, linear output; "
                               "output bias = mean training age; Glorot-uniform init",
                "per_subensemble": {s: self.subensemble_card(s)["net_kwargs"]
                                    for s in self.subensembles}}

    def preprocessing(self) -> dict[str, Any]:
        return {"function": "bidsapp.transforms.mni_pruned.prepare_mni_input",
                "params": self.input_params,
                "inputs": ["space-MNI152NLin2009aSym_res-2_desc-preproc_T1w (brain-masked)"],
                "description": (
                    "intensities x 255 / 99th brain percentile, clipped at clip_factor x 255 and "
                    "re-normalised to 0-255; region mask (type ii); resampled to resolution_mm; "
                    "pruned to the template brain's bounding box + margin_voxels (fixed, from "
                    "the bundled template); uint8; network input uint8 / 255")}

    def export_ensemble(self, config, records, splits, fold_results, work_dir, device, *,
                        caches, ridge=None, wall_seconds=None):
        from .ensemble import export_mlens

        return export_mlens(self, config, records, splits, fold_results, work_dir, device,
                            caches=caches, ridge=ridge, wall_seconds=wall_seconds)


class LocalUNetFamily(ModelFamily):
    """Seed 000 (Popescu et al.): voxelwise brain age with a U-Net on modulated GM/WM blocks.

    ``[model]`` holds the network keys (``init_channels``, ``depth``, ``convs_per_scale``,
    ``se``, ``se_reduction``, ``dropout``, ``negative_slope``; see
    :class:`bidsapp.nets.LocalUNet`), the input block side ``block_size`` (the output side
    follows from the valid convolutions: 52 -> 12 for depth 2), the training keys
    ``aux_weights`` (initial alpha of each auxiliary head, coarsest first; one per level),
    ``aux_decay_epochs`` (epochs over which they decay linearly to 0), ``blocks_per_scan``
    (random blocks per training scan and epoch) and ``val_blocks`` (0: validate on the tiled
    map; n: on n fixed blocks per scan), and the inference keys ``mc_samples`` (Monte-Carlo
    dropout samples per fold network, 0 = off) and ``tile_stride`` (default: the output side).
    ``standardize_input`` (default false, the paper's raw maps) makes each fold network carry
    the voxelwise mean and SD of its training scans' inputs and see voxelwise z-scores
    (:meth:`bidsapp.nets.LocalUNet.standardize`).
    ``[input]`` holds :class:`bidsapp.transforms.modulated.ModulatedInputSpec` keys.
    """

    name = "local-unet"
    seed_paper = ("Popescu et al., Local brain-age: a U-Net model (Front. Aging Neurosci. 2021): "
                  "voxelwise brain age from modulated GM/WM maps (seed 000)")
    _NET_KEYS = {"init_channels", "depth", "convs_per_scale", "se", "se_reduction", "dropout",
                 "negative_slope"}
    _RUN_KEYS = {"block_size", "aux_weights", "aux_decay_epochs", "blocks_per_scan",
                 "val_blocks", "mc_samples", "tile_stride", "standardize_input"}

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        from bidsapp.nets.local_unet import local_unet_sizes
        from bidsapp.transforms.modulated import ModulatedInputSpec

        super().__init__(model_params, input_params)
        p = self.model_params
        unknown = sorted(set(p) - self._NET_KEYS - self._RUN_KEYS)
        if unknown:
            raise UsageError(f"[model] has unknown key(s) {unknown} for local-unet; allowed: "
                             f"{sorted(self._NET_KEYS | self._RUN_KEYS)}")
        try:
            self.spec = ModulatedInputSpec.from_dict(self.input_params)
            kwargs = self.net_kwargs()
            self.in_size = int(p.get("block_size", 52))
            sizes = local_unet_sizes(self.in_size, kwargs["depth"], kwargs["convs_per_scale"])
            self.build_network()
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid local-unet [model]/[input]: {exc}") from exc
        self.out_size, self.margin = sizes["output"], sizes["margin"]
        self.aux_weights = [float(a) for a in p.get("aux_weights", [1.0] * kwargs["depth"])]
        if len(self.aux_weights) != kwargs["depth"] or min(self.aux_weights) < 0:
            raise UsageError(f"model.aux_weights needs {kwargs['depth']} non-negative values (one "
                             f"per auxiliary head), got {self.aux_weights}")
        self.aux_decay_epochs = float(p.get("aux_decay_epochs", 10.0))
        self.blocks_per_scan = int(p.get("blocks_per_scan", 1))
        self.val_blocks = int(p.get("val_blocks", 0))
        self.mc_samples = int(p.get("mc_samples", 0))
        self.tile_stride = int(p.get("tile_stride", self.out_size))
        if self.aux_decay_epochs < 0 or self.blocks_per_scan < 1 or self.val_blocks < 0:
            raise UsageError("model.aux_decay_epochs must be >= 0, blocks_per_scan >= 1 and "
                             "val_blocks >= 0")
        if not 1 <= self.tile_stride <= self.out_size:
            raise UsageError(f"model.tile_stride must be in [1, {self.out_size}] (the output "
                             f"block), got {self.tile_stride}")
        if self.mc_samples < 0 or (self.mc_samples and not kwargs["dropout"] > 0):
            raise UsageError("model.mc_samples must be >= 0, and Monte-Carlo dropout "
                             "(mc_samples > 0) needs model.dropout > 0")
        self.input_params = self.spec.to_dict()

    def net_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`bidsapp.nets.LocalUNet` (JSON-serialisable)."""
        p = self.model_params
        standardize = p.get("standardize_input", False)
        if not isinstance(standardize, bool):
            raise ValueError(f"model.standardize_input must be true or false, got {standardize!r}")
        extra = {}
        if standardize:
            from bidsapp.transforms.modulated import MODULATED_TISSUES, brain_mask

            extra["input_shape"] = [len(MODULATED_TISSUES), *brain_mask(self.spec).shape]
        return {**extra, "spatial_dims": 3, "in_channels": 2, "out_channels": 1,
                "init_channels": int(p.get("init_channels", 64)), "depth": int(p.get("depth", 2)),
                "convs_per_scale": int(p.get("convs_per_scale", 2)), "se": bool(p.get("se", True)),
                "se_reduction": int(p.get("se_reduction", 16)),
                "dropout": float(p.get("dropout", 0.0)),
                "act": ["leakyrelu", {"negative_slope": float(p.get("negative_slope", 0.2)),
                                      "inplace": False}]}

    def build_network(self) -> nn.Module:
        from bidsapp.nets.local_unet import LocalUNet

        kwargs = self.net_kwargs()
        kwargs["act"] = tuple(kwargs["act"])
        return LocalUNet(**kwargs)

    def block_geometry(self) -> dict[str, Any]:
        """Block sides, margin and the inference settings (the card's ``blocks``)."""
        return {"in_size": self.in_size, "out_size": self.out_size, "margin": self.margin,
                "tile_stride": self.tile_stride, "mc_samples": self.mc_samples,
                "receptive_field_voxels": self.in_size - self.out_size + 1}

    @property
    def mask(self) -> np.ndarray:
        """Template brain mask in the brain box (training blocks, tiling, global mean)."""
        if not hasattr(self, "_mask"):
            from bidsapp.transforms.modulated import brain_mask

            self._mask = brain_mask(self.spec)
            self._mask_voxels = np.argwhere(self._mask)
        return self._mask

    @property
    def mask_voxels(self) -> np.ndarray:
        """``np.argwhere(mask)``."""
        self.mask  # noqa: B018 - fills the cache
        return self._mask_voxels

    @property
    def tiles(self) -> np.ndarray:
        """Output-block origins tiling the mask with stride = output side."""
        if not hasattr(self, "_tiles"):
            from bidsapp.transforms.blocks import tile_origins

            self._tiles = tile_origins(self.mask, self.out_size)
        return self._tiles

    def prepare(self, record: ScanRecord) -> list[np.ndarray]:
        from bidsapp.transforms.modulated import modulated_paths, prepare_modulated_input

        paths = modulated_paths(record.t1w.parent, record.key, self.spec)
        return [prepare_modulated_input(paths, self.spec).data]

    def prepare_robustness(self, record: ScanRecord, spacing_mm: float) -> list[np.ndarray]:
        raise NotImplementedError("local-unet reads MNI-space modulated maps; thick-slice "
                                  "robustness needs re-segmentation and re-registration (set "
                                  "export.robustness_spacings_mm = [])")

    def augment(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # the paper trains without augmentation; random block positions are the only variation
        return np.asarray(view, dtype=np.float32)

    def keep(self, views: list[np.ndarray]) -> bool:
        return bool(np.any(views[0][:, self.mask] > 0))

    def trainer_class(self):
        from .local_unet import LocalUNetTrainer

        return LocalUNetTrainer

    def evaluate_fold(self, cache, test, best_path, device, robustness_spacings=()):
        from .local_unet import evaluate_local_unet

        if robustness_spacings:
            raise UsageError("local-unet has no thick-slice robustness check; set "
                             "export.robustness_spacings_mm = []")
        return evaluate_local_unet(self, cache, test, best_path, device)

    def card_extras(self, fold_results) -> dict[str, Any]:
        from .local_unet import local_unet_card_extras

        return local_unet_card_extras(self, fold_results)

    def architecture(self) -> dict[str, Any]:
        from bidsapp.nets.local_unet import LocalUNet

        net = self.build_network()
        return {"class": f"{LocalUNet.__module__}.{LocalUNet.__name__}",
                "params": self.model_params, "net_kwargs": self.net_kwargs(), "blocks": self.block_geometry(),
                "n_parameters": int(sum(q.numel() for q in net.parameters())),
                "description": "U-Net: valid 3x3x3 convolutions (two per scale), LeakyReLU, "
                               "squeeze-and-excitation after every convolution, 2x2x2 average "
                               "pooling, transposed-convolution upsampling, centre-cropped skips; "
                               "voxelwise age of the central block; auxiliary block-level heads "
                               "(global average pooling + dense) at the coarser scales, training "
                               "only; output = target_offset + target_scale * raw",
                "loss": "voxelwise L1 on the brain voxels of the output block + aux_weights x "
                        "block-level L1, aux weights decaying linearly to 0 over "
                        f"{self.aux_decay_epochs:g} epochs (eq. 5)"}

    def preprocessing(self) -> dict[str, Any]:
        res = "1p5" if self.spec.source_resolution_mm == 1.5 else "2"
        return {"function": "bidsapp.transforms.modulated.prepare_modulated_input",
                "params": self.spec.to_dict(),
                "inputs": [f"space-MNI152NLin2009aSym_res-{res}_label-{t}_desc-modulated_probseg"
                           for t in ("GM", "WM")],
                "description": (
                    "Jacobian-modulated GM and WM maps on the template grid, smoothed with a "
                    "Gaussian of fwhm_mm FWHM, resampled (anti-aliased) to resolution_mm when "
                    "coarser than the participant grid, cropped to the bounding box of the "
                    "template brain mask; 2 channels, no intensity normalisation. Blocks: "
                    "training samples output blocks centred on random template-mask voxels; "
                    "inference tiles the template mask")}


_FAMILIES: dict[str, type[ModelFamily]] = {DenseNetClinicalFamily.name: DenseNetClinicalFamily}
_FAMILIES[MLensFamily.name] = MLensFamily
_FAMILIES[LocalUNetFamily.name] = LocalUNetFamily


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


@register_family
class VGGCBVFamily(ModelFamily):
    """Seed 003 (Jomsky et al.): VGG8 on the MNI-space T1w, linear stacking of its prediction.

    ``[model]`` holds ``branch`` (only ``"t1w"`` so far: the synthetic-CBV branch and the
    two-channel network need the CBV synthesis network), ``channels`` (16, 32, 64, 128, 256),
    ``dense_units`` (512, 128) and ``dropout`` (0).  ``[input]`` holds
    :class:`bidsapp.transforms.mni_affine.MNIAffineSpec` keys.  Training minimises the L1 loss
    (:class:`training.trainer.L1Trainer`).  The card gets the paper's stacks on the cross-validation
    predictions (``T`` and, with sex known, ``TS``) with their cross-fitted MAE and the
    coefficients the app applies (:mod:`bidsapp.inference.vgg_cbv`), their nested F-test and
    MAE per 5-year age band and per site (:mod:`training.stacking`).
    """

    name = "vgg-cbv"
    seed_paper = ("Jomsky et al., integrating AI-synthesised cerebral blood volume (AICBV) with "
                  "T1w MRI for brain age: 3D VGG8 per modality, linear stacking (seed 003)")
    _NET_KEYS = {"branch", "channels", "dense_units", "dropout"}

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        from bidsapp.transforms.mni_affine import MNIAffineSpec

        super().__init__(model_params, input_params)
        unknown = sorted(set(self.model_params) - self._NET_KEYS)
        if unknown:
            raise UsageError(f"[model] has unknown key(s) {unknown} for vgg-cbv; allowed: "
                             f"{sorted(self._NET_KEYS)}")
        branch = self.model_params.setdefault("branch", "t1w")
        if branch != "t1w":
            raise UsageError(f"model.branch {branch!r} is not available yet: only the T1w "
                             "branch ('t1w') is trained by this version")
        for key in ("channels", "dense_units"):
            if key in self.model_params:
                self.model_params[key] = [int(v) for v in self.model_params[key]]
        try:
            self.spec = MNIAffineSpec.from_dict(self.input_params)
            self.build_network()
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid vgg-cbv [model]/[input]: {exc}") from exc
        self.input_params = self.spec.to_dict()

    def net_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`bidsapp.nets.VGG8` (JSON-serialisable)."""
        p = self.model_params
        kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                  "in_shape": list(self.spec.shape)}
        for key in ("channels", "dense_units"):
            if key in p:
                kwargs[key] = list(p[key])
        if "dropout" in p:
            kwargs["dropout"] = float(p["dropout"])
        return kwargs

    def build_network(self) -> nn.Module:
        from bidsapp.nets import VGG8

        return VGG8(**self.net_kwargs())

    def prepare(self, record: ScanRecord) -> list[np.ndarray]:
        from bidsapp.transforms.mni_affine import prepare_vgg_input

        return [prepare_vgg_input(mni_t1w_path(record), self.spec).data]

    def prepare_robustness(self, record: ScanRecord, spacing_mm: float) -> list[np.ndarray]:
        raise NotImplementedError("vgg-cbv reads the MNI-space T1w; thick-slice robustness needs "
                                  "re-registration (set export.robustness_spacings_mm = [])")

    # as seed 002: no augmentation (neither paper uses any); usable when any voxel is brain
    augment = MLensBaseFamily.augment
    keep = MLensBaseFamily.keep

    def trainer_class(self):
        from .trainer import L1Trainer  # trainer.py imports this module

        return L1Trainer

    def evaluate_fold(self, cache, test, best_path, device, robustness_spacings=()):
        result = super().evaluate_fold(cache, test, best_path, device, robustness_spacings)
        for row, record in zip(result["rows"], test):  # the per-site MAE table needs the site
            row["site"] = record.site
        return result

    def card_extras(self, fold_results) -> dict[str, Any]:
        import pandas as pd

        from .stacking import (STACKS, available_stacks, fit_stack, fit_stacks, mae_by_group,
                               nested_f_tests)

        frame = pd.DataFrame([{"fold": k, "age": r["age"], "t1w": r["predicted"],
                               "sex": r.get("sex"), "site": r.get("site") or "n/a"}
                              for k, result in sorted(fold_results.items()) for r in result["rows"]])
        folds = sorted(set(frame.fold))
        if len(folds) < 2:
            return {"stacking": {"skipped": "cross-fitted stacking needs at least 2 folds"}}
        stacks = available_stacks(frame)
        # cross-fitted: each fold's stack is fitted on the other folds' held-out predictions
        stacked = pd.concat([fit_stacks(frame[frame.fold != k], frame[frame.fold == k], stacks)[0]
                             for k in folds]).loc[frame.index]
        predictions = {"network": frame["t1w"], **{s: stacked[s] for s in stacks}}
        age = frame["age"].to_numpy()
        return {"stacking": {
            "stacks": {s: {"predictors": s, "columns": list(STACKS[s]),
                           "cv_mae": float(np.mean(np.abs(stacked[s] - age))),
                           # what the app applies: refitted on every fold's held-out predictions
                           "coef": [float(c) for c in fit_stack(frame, s).params]}
                       for s in stacks},
            "fitting": "ordinary least squares of age on the T1w network's prediction (and sex, "
                       "0 female / 1 male); cv_mae cross-fitted over the folds (fitted on the "
                       "other folds' held-out predictions; the paper fitted on train + validation "
                       "predictions of one split); coef (intercept first, then columns) fitted "
                       "on all folds' held-out predictions, applied by the app to the fold "
                       "ensemble's prediction",
            "f_tests": nested_f_tests(frame).to_dict(orient="records"),
            "f_tests_on": "the pooled held-out (CV) predictions",
            "mae_by_age_band": mae_by_group(frame, predictions, "age_band").to_dict(orient="index"),
            "mae_by_site": mae_by_group(frame, predictions, "site").to_dict(orient="index")}}

    def architecture(self) -> dict[str, Any]:
        from bidsapp.nets import VGG8

        net = self.build_network()
        return {"class": f"{VGG8.__module__}.{VGG8.__name__}", "params": self.model_params,
                "net_kwargs": self.net_kwargs(),
                "n_parameters": int(sum(q.numel() for q in net.parameters())),
                "description": "5 blocks of 3^3 convolution ('same'), batch norm, ReLU, 2^3 "
                               "max-pool; flatten, dense 512 -> ReLU -> 128 -> ReLU -> 1; "
                               "output = target_offset + target_scale * raw",
                "loss": "L1 (mean absolute error)", "explanation": "Grad-CAM on the last "
                "convolution block, top 20 % of each map (bidsapp.explain.gradcam)"}

    def preprocessing(self) -> dict[str, Any]:
        return {"function": "bidsapp.transforms.mni_affine.prepare_vgg_input",
                "params": self.spec.to_dict(),
                "inputs": ["space-MNI152NLin2009aSym_res-2_desc-preproc_T1w (brain-masked)"],
                "description": (
                    "participant-level MNI-space T1w (non-linear registration; the paper used an "
                    "affine one) divided by the mean of its top top_fraction brain intensities; "
                    "resampled (anti-aliased) to resolution_mm; cropped/zero-padded to shape "
                    "around the template brain's bounding-box centre")}
