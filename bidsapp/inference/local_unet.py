"""Prediction with a shipped local-unet model (seed 000): voxelwise brain-age maps.

The model card ``local-unet/model_card.json`` (written by ``brainage-train`` with
``family = "local-unet"``) gives the architecture, the input preparation
(:mod:`bidsapp.transforms.modulated`), the block geometry and the fold weights
(sha256-checked).  For one participant's modulated GM/WM maps:

1. the input is prepared on the model's grid and cropped to the template brain box (and
   z-scored voxelwise with the training statistics each fold network carries, when it does);
2. every fold network is tiled over the template brain mask (:func:`tiled_age_map`): output
   blocks of ``out_size`` voxels with stride ``tile_stride``, overlaps averaged;
3. with ``mc_samples`` > 0 each fold network is run that many times with dropout active
   (Monte-Carlo dropout), otherwise once in eval mode; the brain-age map is the voxelwise mean
   over all fold x sample maps and the SD map their voxelwise standard deviation;
4. the global brain age is the mean of the brain-age map over the brain mask (the paper's
   global value), with the interval of :func:`~bidsapp.inference.densenet_clinical.fold_interval`
   over the global values of the individual maps (it measures the disagreement of folds and
   dropout samples, not the error against chronological age);
5. the maps are put on the 2 mm template grid (what the group level reads; interpolated when the
   model works on another grid) with NaN outside the brain mask, and summarised per
   Harvard–Oxford ROI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..transforms.blocks import tile_predict
from ..transforms.modulated import (ModulatedInput, ModulatedInputSpec, modulated_paths,
                                    prepare_modulated_input, to_template_grid)
from .registry import require_family
from .weights import load_card_state_dicts, network_with_state

__all__ = ["MODEL_ID", "LocalUNetPrediction", "LocalUNetPredictor", "tiled_age_map",
           "network_from_card", "roi_table", "predict_local_unet"]

LOGGER = logging.getLogger("brainage.inference")
MODEL_ID = "local-unet"
#: Resolution (mm) of the written maps: the grid of the group-level analyses.
MAP_RESOLUTION_MM = 2.0


@torch.no_grad()
def tiled_age_map(net: nn.Module, data: np.ndarray, mask: np.ndarray, in_size: int,
                  out_size: int, *, stride: int | None = None, device: torch.device | str = "cpu",
                  batch_size: int = 4) -> np.ndarray:
    """Voxelwise brain age of one prepared input, tiled over ``mask``.

    The network is used in the mode it is in (eval, or Monte-Carlo dropout; see
    :func:`bidsapp.nets.local_unet.enable_mc_dropout`).  A network that carries voxelwise input
    statistics sees the z-scored input (:meth:`bidsapp.nets.LocalUNet.standardize`).

    Parameters
    ----------
    net : LocalUNet
    data : ndarray, shape (2, X, Y, Z)
    mask : ndarray of bool, shape (X, Y, Z)
    in_size, out_size : int
        Block geometry of ``net``.
    stride : int, optional
        Tile stride (default ``out_size``).
    device : torch device
    batch_size : int

    Returns
    -------
    ndarray, shape (X, Y, Z)
        Years inside ``mask``, NaN elsewhere.
    """
    device = torch.device(device)
    standardize = getattr(net, "standardize", None)
    if standardize is not None:
        data = standardize(data)

    def predict(x: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(x).to(device)).float().cpu().numpy()[:, 0]

    return tile_predict(predict, data, mask, in_size, out_size, stride=stride,
                        batch_size=batch_size)


def network_from_card(card: Mapping[str, Any]):
    """An untrained network and the block geometry described by a model card.

    Returns
    -------
    (LocalUNet, dict)
        The network and ``card["architecture"]["blocks"]`` (``in_size``, ``out_size``, …).
    """
    from ..nets.local_unet import LocalUNet

    try:
        kwargs = dict(card["architecture"]["net_kwargs"])
        kwargs["act"] = tuple(kwargs["act"])
        blocks = dict(card["architecture"]["blocks"])
        net = LocalUNet(**kwargs)
        sizes = net.sizes(int(blocks["in_size"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model card {card.get('id')} is incomplete or invalid: {exc}") from exc
    if sizes["output"] != int(blocks["out_size"]):
        raise ModelError(f"model card {card.get('id')}: block {blocks['in_size']} gives "
                         f"{sizes['output']} output voxels, the card says {blocks['out_size']}")
    return net, blocks


@dataclass(frozen=True)
class LocalUNetPrediction:
    """Result for one participant.

    Attributes
    ----------
    brain_age, lower, upper : float
        Mean of the brain-age map over the brain mask, and its 95 % interval (years).
    age_map, sd_map : ndarray
        Voxelwise mean and SD over the fold x sample maps, on the brain box of the model's grid
        (NaN outside the mask).
    sample_global : tuple of float
        Global value of each fold x sample map.
    n_folds, mc_samples : int
    spec : ModulatedInputSpec
    """

    brain_age: float
    lower: float
    upper: float
    age_map: np.ndarray
    sd_map: np.ndarray
    sample_global: tuple[float, ...]
    n_folds: int
    mc_samples: int
    spec: ModulatedInputSpec

    def images(self, age: float | None = None) -> dict[str, Any]:
        """The maps on the 2 mm template grid: ``brainagemap``, ``brainagesdmap`` and, when
        ``age`` is known, ``brainpadmap`` (brain age minus ``age``)."""
        from ..anat.grid import new_image

        images = {"brainagemap": to_template_grid(self.age_map, self.spec, MAP_RESOLUTION_MM),
                  "brainagesdmap": to_template_grid(self.sd_map, self.spec, MAP_RESOLUTION_MM)}
        if age is not None and np.isfinite(age):
            img = images["brainagemap"]
            images["brainpadmap"] = new_image(np.asarray(img.dataobj, np.float32) - float(age),
                                              img.affine)
        return images


class LocalUNetPredictor:
    """The fold networks of a local-unet card, ready to predict.

    Parameters
    ----------
    card : mapping
        Parsed model card.
    folder : path
        Folder the card's weight paths are relative to.
    device : str
        Torch device.
    mc_samples : int, optional
        Monte-Carlo dropout samples per fold (default: the card's; 0 = deterministic).
    tile_stride : int, optional
        Tile stride (default: the card's).
    """

    def __init__(self, card: Mapping[str, Any], folder: str | Path, device: str = "cpu", *,
                 mc_samples: int | None = None, tile_stride: int | None = None) -> None:
        require_family(card, MODEL_ID, article="a")
        self.card = dict(card)
        self.device = torch.device(device)
        try:
            self.spec = ModulatedInputSpec.from_dict(card["input"]["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card {card.get('id')} is incomplete or invalid: "
                             f"{exc}") from exc
        _, self.blocks = network_from_card(card)
        self.in_size, self.out_size = int(self.blocks["in_size"]), int(self.blocks["out_size"])
        self.mc_samples = int(self.blocks.get("mc_samples", 0) if mc_samples is None
                              else mc_samples)
        self.tile_stride = int(self.blocks.get("tile_stride", self.out_size)
                               if tile_stride is None else tile_stride)
        if self.mc_samples < 0 or not 1 <= self.tile_stride <= self.out_size:
            raise ModelError(f"mc_samples must be >= 0 and tile_stride in [1, {self.out_size}], "
                             f"got {self.mc_samples} and {self.tile_stride}")
        self.networks = [network_with_state(network_from_card(card)[0], state, self.device,
                                            f"weights of {card.get('id')}")
                         for state in load_card_state_dicts(card, folder)]
        if self.mc_samples and not any(m.p > 0 for m in self.networks[0].modules()
                                       if isinstance(m, nn.Dropout)):
            raise ModelError(f"model {card.get('id')} has no dropout: Monte-Carlo dropout "
                             "(mc_samples > 0) is not possible")

    @classmethod
    def from_models_dir(cls, models_dir: str | Path | None = None, device: str = "cpu",
                        **kwargs) -> "LocalUNetPredictor":
        """Load ``<models_dir>/local-unet/model_card.json`` (default: the registry's folder)."""
        from .registry import read_card

        card, folder = read_card(MODEL_ID, models_dir)
        return cls(card, folder, device=device, **kwargs)

    def input_paths(self, anat_dir: str | Path, prefix: str) -> tuple[Path, ...]:
        """The participant-level modulated maps this model reads."""
        return modulated_paths(anat_dir, prefix, self.spec)

    def prepare(self, paths: Sequence[str | Path]) -> ModulatedInput:
        """Network input from the modulated GM and WM maps."""
        return prepare_modulated_input(paths, self.spec)

    def sample_maps(self, prepared: ModulatedInput, seed: int = 0) -> list[np.ndarray]:
        """One brain-age map per fold network and dropout sample (brain box, NaN outside)."""
        from ..nets.local_unet import enable_mc_dropout

        maps = []
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)  # reproducible dropout masks
        try:
            for net in self.networks:
                samples = self.mc_samples or 1
                if self.mc_samples:
                    enable_mc_dropout(net)
                for _ in range(samples):
                    maps.append(tiled_age_map(net, prepared.data, prepared.mask, self.in_size,
                                              self.out_size, stride=self.tile_stride,
                                              device=self.device))
                net.eval()
        finally:
            torch.set_rng_state(generator_state)
        return maps

    def predict_prepared(self, prepared: ModulatedInput) -> LocalUNetPrediction:
        """Prediction from an input made by :meth:`prepare`."""
        from .densenet_clinical import fold_interval

        maps = np.stack(self.sample_maps(prepared))
        mask = prepared.mask
        values = maps[:, mask].astype(np.float64)
        mean_map = np.full(mask.shape, np.nan, dtype=np.float32)
        sd_map = np.full(mask.shape, np.nan, dtype=np.float32)
        mean_map[mask] = values.mean(axis=0)
        sd_map[mask] = values.std(axis=0, ddof=1) if len(values) > 1 else 0.0
        sample_global = values.mean(axis=1)
        brain_age = float(mean_map[mask].mean())
        _, lower, upper = fold_interval(sample_global)
        return LocalUNetPrediction(brain_age=brain_age, lower=lower, upper=upper,
                                   age_map=mean_map, sd_map=sd_map,
                                   sample_global=tuple(float(v) for v in sample_global),
                                   n_folds=len(self.networks), mc_samples=self.mc_samples,
                                   spec=self.spec)

    def predict(self, paths: Sequence[str | Path]) -> LocalUNetPrediction:
        """Brain age of one participant's modulated GM and WM maps."""
        return self.predict_prepared(self.prepare(paths))


def roi_table(age_img, age: float | None = None):
    """Mean brain age (and brain-PAD) per Harvard–Oxford ROI of a brain-age map.

    Parameters
    ----------
    age_img : nibabel image
        Brain-age map on an MNI grid (NaN outside the brain).
    age : float, optional
        Chronological age; adds ``brain_pad`` (ROI brain age minus age, the paper's ROI-level
        brain-PAD).

    Returns
    -------
    pandas.DataFrame
        ``index, name, hemisphere, atlas, n_voxels, brain_age, brain_pad`` for every ROI with at
        least one voxel in the map.
    """
    from ..atlases import load_harvard_oxford, roi_means

    labels_img, table = load_harvard_oxford(age_img)
    labels = np.asarray(labels_img.dataobj).ravel()
    values = np.asarray(age_img.dataobj, dtype=np.float64).ravel()
    finite = np.isfinite(values)
    present = [int(k) for k in table["index"] if np.any(finite & (labels == k))]
    means = roi_means(values[finite][None], labels[finite], present)[0]
    out = table.set_index("index").loc[present, ["name", "hemisphere", "atlas"]].reset_index()
    out["n_voxels"] = [int(np.sum(finite & (labels == k))) for k in present]
    out["brain_age"] = means
    known = age is not None and np.isfinite(age)
    out["brain_pad"] = means - float(age) if known else np.nan
    return out


def predict_local_unet(anat_dir: str | Path, prefix: str, *, models_dir: str | Path | None = None,
                       device: str = "cpu", age: float | None = None,
                       out_dir: str | Path | None = None) -> LocalUNetPrediction:
    """Predict one participant's local brain age with the shipped model.

    Parameters
    ----------
    anat_dir : path
        Participant-level ``anat`` folder holding the modulated maps.
    prefix : str
        Entity prefix of the T1w (``sub-01``).
    models_dir : path, optional
        Models folder with ``local-unet/model_card.json`` (default: the installed models).
    device : str
    age : float, optional
        Chronological age (for the PAD map and ROI brain-PAD).
    out_dir : path, optional
        Write the maps (``<suffix>.nii.gz``) and ``roi.tsv`` here.

    Returns
    -------
    LocalUNetPrediction
    """
    predictor = LocalUNetPredictor.from_models_dir(models_dir, device=device)
    result = predictor.predict(predictor.input_paths(anat_dir, prefix))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        images = result.images(age)
        for suffix, img in images.items():
            img.to_filename(str(out / f"{suffix}.nii.gz"))
        roi_table(images["brainagemap"], age).to_csv(out / "roi.tsv", sep="\t", index=False,
                                                     na_rep="n/a", float_format="%.4f")
    return result
