"""Prediction with a vgg-cbv model (seed 003): fold ensemble, linear stack, Grad-CAM map.

The model card (written by ``brainage-train`` with ``family = "vgg-cbv"``) gives the VGG8
architecture (``architecture.net_kwargs``), the input preparation
(:mod:`bidsapp.transforms.mni_affine`), the fold weights (sha256-checked) and the linear stacks
of Jomsky et al. (``stacking.stacks``: for each stack its ``columns`` and ``coef``, intercept
first, fitted on the held-out predictions of all folds).  Each weights entry belongs to a
*branch*: ``t1w`` (the VGG8 on the MNI-space T1w; the default) or ``cbv`` (the VGG8 on a cerebral
blood volume map).  For one participant:

1. each branch's input is prepared from the 2 mm MNI-space image (T1w, or the CBV map that a
   user-supplied synthesis network made from it, :func:`synthesise_cbv_image`);
2. every fold network of a branch predicts the age;
3. the stack is chosen: the first of ``TAS``, ``TA``, ``TS``, ``T`` (the paper's full model
   first) that the card has coefficients for and whose predictors this participant has: the CBV
   prediction only when a CBV branch ran, the sex (coded 0 female / 1 male,
   :func:`bidsapp.bids.ages.sex_code`) only when ``participants.tsv`` gives it, so a participant
   without a known sex gets ``T`` (with a logged note);
4. the stack is applied to each fold's predictions (fold ``k`` of the T1w branch with fold ``k``
   of the CBV branch); the brain age is the mean over folds and the 95 % interval the one of the
   other families, :func:`~bidsapp.inference.densenet_clinical.fold_interval` of those per-fold
   values (the stack is linear, so the mean equals the stack applied to the fold means);
5. explanation: Grad-CAM of the last convolution block of every T1w-branch fold network
   (MONAI, :mod:`bidsapp.explain.gradcam`), averaged, put on the 2 mm template grid, and the
   top 20 % of its values inside the participant's brain kept, as the paper did.

A card exported before the stacks carried coefficients gives the fold ensemble's plain mean
(stack ``none``, logged); re-exporting the training run (``--resume``) adds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..bids.ages import sex_code
from ..errors import ModelError
from ..transforms import Volume
from ..transforms.mni_affine import MNIAffineSpec, prepare_vgg_input
from .densenet_clinical import fold_interval
from .registry import require_family
from .weights import load_card_state_dicts, network_with_state, sha256_file

__all__ = ["MODEL_ID", "BRANCHES", "STACK_PREFERENCE", "GRADCAM_TOP_FRACTION", "card_branches",
           "VGGCBVPrediction", "VGGCBVPredictor", "predict_vgg_cbv", "synthesise_cbv_image",
           "cbv_source_label", "check_cbv_request"]

LOGGER = logging.getLogger("brainage.inference")
MODEL_ID = "vgg-cbv"
#: Branch ids of the card's weights entries and how the provenance names them.
BRANCHES = {"t1w": "T1w", "cbv": "CBV"}
#: Stacks tried in this order: the paper's full model (T1w + CBV + sex) first.
STACK_PREFERENCE = ("TAS", "TA", "TS", "T")
#: Share of each Grad-CAM map's brain voxels kept (Jomsky et al., Fig. 4: "top 20 %").
GRADCAM_TOP_FRACTION = 0.2
_COLUMNS = ("t1w", "cbv", "sex")


def card_branches(card: Mapping[str, Any]) -> tuple[str, ...]:
    """Branches a vgg-cbv card has weights for (``t1w`` first).

    Raises
    ------
    ModelError
        A weights entry of an unknown branch.

    Examples
    --------
    >>> card_branches({"architecture": {"params": {"branch": "t1w"}},
    ...                "weights": [{"fold": 0}, {"fold": 0, "branch": "cbv"}]})
    ('t1w', 'cbv')
    """
    default = str(card.get("architecture", {}).get("params", {}).get("branch", "t1w"))
    found = {str(w.get("branch", default)) for w in card.get("weights", [])
             if isinstance(w, Mapping)}
    unknown = sorted(found - set(BRANCHES))
    if unknown:
        raise ModelError(f"model card {card.get('id')}: weights of unknown branch(es) {unknown}; "
                         f"known: {', '.join(BRANCHES)}")
    return tuple(b for b in BRANCHES if b in found)


def _card_stacks(card: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The card's stacks that carry coefficients: name -> columns, coef, cv_mae."""
    stacks = {}
    entries = card.get("stacking", {}).get("stacks", {}) if isinstance(card.get("stacking"), Mapping) \
        else {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping) or "coef" not in entry:
            continue
        try:
            columns = tuple(str(c) for c in entry["columns"])
            coef = np.asarray(entry["coef"], dtype=float)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card {card.get('id')}: stack {name} is invalid: {exc}") from exc
        if set(columns) - set(_COLUMNS) or coef.shape != (len(columns) + 1,) \
                or not np.all(np.isfinite(coef)):
            raise ModelError(f"model card {card.get('id')}: stack {name} needs one coefficient per "
                             f"column of {list(_COLUMNS)} plus the intercept, got columns "
                             f"{list(columns)} and coef {entry['coef']}")
        stacks[str(name)] = {"columns": columns, "coef": coef, "cv_mae": entry.get("cv_mae")}
    return stacks


@dataclass(frozen=True)
class VGGCBVPrediction:
    """Result for one MNI-space T1w.

    Attributes
    ----------
    brain_age, lower, upper : float
        Stacked fold-ensemble prediction and its 95 % fold interval (years).
    stack : str
        ``T``, ``TS``, ``TA``, ``TAS``, or ``none`` (a card without stack coefficients).
    columns : tuple of str
        The stack's predictors (``t1w``, ``cbv``, ``sex``).
    coef : tuple of float
        The stack's coefficients, intercept first.
    branches : tuple of str
        Branches that ran (``t1w``; ``t1w`` and ``cbv``).
    fold_predictions : tuple of float
        The stack applied to each fold's network predictions.
    branch_predictions : dict
        Branch -> each fold network's own prediction (years).
    sex_code : int or None
        Sex as the stack saw it (0 female, 1 male), ``None`` when unknown.
    notes : tuple of str
        Why a stack richer than the one applied was not used.
    cbv_source : str or None
        Where the CBV map came from (a synthesis checkpoint), when the CBV branch ran.
    """

    brain_age: float
    lower: float
    upper: float
    stack: str
    columns: tuple[str, ...]
    coef: tuple[float, ...]
    branches: tuple[str, ...]
    fold_predictions: tuple[float, ...]
    branch_predictions: dict[str, tuple[float, ...]] = field(repr=False)
    sex_code: int | None = None
    notes: tuple[str, ...] = ()
    cbv_source: str | None = None

    def provenance(self) -> dict[str, Any]:
        """What produced the row, for the ``_brainage.json`` sidecar (JSON-serialisable)."""
        return {"Branches": "+".join(BRANCHES[b] for b in self.branches),
                "Stack": self.stack, "StackPredictors": list(self.columns),
                "StackCoefficients": list(self.coef), "SexCode": self.sex_code,
                "CBVSource": self.cbv_source, "Notes": list(self.notes)}

    def details(self) -> dict[str, Any]:
        """JSON-serialisable details for the prediction record."""
        return {"stack": self.stack, "branches": list(self.branches),
                "fold_predictions": list(self.fold_predictions),
                "branch_predictions": {b: list(v) for b, v in self.branch_predictions.items()},
                "sex_code": self.sex_code, "notes": list(self.notes),
                "cbv_source": self.cbv_source}


class VGGCBVPredictor:
    """The fold networks and stacks of a vgg-cbv card, ready to predict and explain.

    Parameters
    ----------
    card : mapping
        Parsed model card.
    folder : path
        Folder the card's weight paths are relative to (as :func:`~.registry.read_card` gives).
    device : str
        Torch device.

    Raises
    ------
    ModelError
        A card of another family, an incomplete card, tampered or missing weights, a CBV branch
        whose folds differ from the T1w branch's, or an invalid stack.
    """

    def __init__(self, card: Mapping[str, Any], folder: str | Path, device: str = "cpu") -> None:
        from ..nets import VGG8

        require_family(card, MODEL_ID)
        self.card = dict(card)
        self.device = torch.device(device)
        branches = card_branches(card)
        default = str(card.get("architecture", {}).get("params", {}).get("branch", "t1w"))
        try:
            self.spec = MNIAffineSpec.from_dict(card["input"]["params"])
            kwargs = dict(card["architecture"]["net_kwargs"])
            keys = [(str(w.get("branch", default)), int(w["fold"])) for w in card["weights"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card {card.get('id')} is incomplete or invalid: {exc}") from exc
        if "t1w" not in branches:
            raise ModelError(f"model card {card.get('id')} has no T1w-branch weights")
        self.networks: dict[str, list[torch.nn.Module]] = {b: [] for b in branches}
        self.folds: dict[str, list[int]] = {b: [] for b in branches}
        states = load_card_state_dicts(card, folder)
        for (branch, fold), state in sorted(zip(keys, states), key=lambda item: item[0]):
            self.networks[branch].append(network_with_state(
                VGG8(**kwargs), state, self.device,
                f"weights of {card.get('id')} ({branch} branch, fold {fold})"))
            self.folds[branch].append(fold)
        if "cbv" in branches and self.folds["cbv"] != self.folds["t1w"]:
            raise ModelError(f"model card {card.get('id')}: the CBV branch has folds "
                             f"{self.folds['cbv']}, the T1w branch {self.folds['t1w']}; the "
                             "stacks pair them fold by fold")
        self.stacks = _card_stacks(card)

    @classmethod
    def from_models_dir(cls, models_dir: str | Path | None = None,
                        device: str = "cpu") -> "VGGCBVPredictor":
        """Load the vgg-cbv card of ``models_dir`` (default: the registry's folder)."""
        from .registry import read_card

        card, folder = read_card(MODEL_ID, models_dir)
        return cls(card, folder, device=device)

    @property
    def branches(self) -> tuple[str, ...]:
        """Branches with weights (``t1w`` first)."""
        return tuple(self.networks)

    def prepare(self, std_t1w, cbv=None) -> dict[str, Volume]:
        """Network inputs: ``t1w`` from the MNI-space T1w, ``cbv`` from a CBV map when given.

        Parameters
        ----------
        std_t1w : path or nibabel image
            ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w`` (brain-masked).
        cbv : path or nibabel image, optional
            CBV map on the same 2 mm template grid (e.g. :func:`synthesise_cbv_image`).
        """
        inputs = {"t1w": prepare_vgg_input(std_t1w, self.spec)}
        if cbv is not None:
            inputs["cbv"] = prepare_vgg_input(cbv, self.spec)
        return inputs

    def choose_stack(self, have: Sequence[str]) -> tuple[str, tuple[str, ...], np.ndarray | None]:
        """The first stack of :data:`STACK_PREFERENCE` the card has and ``have`` covers.

        Parameters
        ----------
        have : sequence of str
            Available predictors among ``t1w``, ``cbv`` and ``sex``.

        Returns
        -------
        (name, columns, coef)
            ``("none", ("t1w",), None)`` when the card has no usable stack coefficients.
        """
        for name in STACK_PREFERENCE:
            stack = self.stacks.get(name)
            if stack is not None and set(stack["columns"]) <= set(have):
                return name, stack["columns"], stack["coef"]
        return "none", ("t1w",), None

    @torch.no_grad()
    def predict_prepared(self, inputs: Mapping[str, Volume], *, sex: Any = None,
                         cbv_source: str | None = None) -> VGGCBVPrediction:
        """Prediction from inputs made by :meth:`prepare`.

        Parameters
        ----------
        inputs : mapping
            From :meth:`prepare`.
        sex : str, optional
            The participant's sex as ``participants.tsv`` gives it (any label of
            :data:`bidsapp.bids.ages.SEX_CODES`); ``None`` or another label: unknown.
        cbv_source : str, optional
            Where the CBV map came from (recorded in the provenance).

        Raises
        ------
        ModelError
            A CBV input for a card without CBV-branch weights.
        """
        if "cbv" in inputs and "cbv" not in self.networks:
            raise ModelError(f"model card {self.card.get('id')} has no CBV-branch weights: it "
                             "cannot use a CBV map")
        raw: dict[str, tuple[float, ...]] = {}
        for branch in self.branches:
            if branch not in inputs:
                continue
            x = torch.from_numpy(np.ascontiguousarray(inputs[branch].data, dtype=np.float32))
            x = x[None, None].to(self.device)
            raw[branch] = tuple(float(net(x)[0, 0]) for net in self.networks[branch])
        code = sex_code(sex)
        have = [c for c in ("t1w", "cbv") if c in raw] + (["sex"] if code is not None else [])
        name, columns, coef = self.choose_stack(have)
        notes = self._notes(name, have, sex, code)
        for note in notes:
            LOGGER.info("vgg-cbv: %s", note)
        if coef is None:
            stacked = np.asarray(raw["t1w"])
        else:
            values = {"t1w": np.asarray(raw["t1w"]), "sex": float(code) if code is not None else 0.0}
            if "cbv" in raw:
                values["cbv"] = np.asarray(raw["cbv"])
            stacked = coef[0] + sum(c * values[col] for c, col in zip(coef[1:], columns))
            stacked = np.broadcast_to(stacked, (len(raw["t1w"]),)).astype(float)
        mean, lower, upper = fold_interval(stacked)
        return VGGCBVPrediction(
            brain_age=mean, lower=lower, upper=upper, stack=name, columns=tuple(columns),
            coef=tuple(float(c) for c in coef) if coef is not None else (),
            branches=tuple(raw), fold_predictions=tuple(float(v) for v in stacked),
            branch_predictions=raw, sex_code=code, notes=tuple(notes),
            cbv_source=cbv_source if "cbv" in raw else None)

    def _notes(self, name: str, have: Sequence[str], sex: Any, code: int | None) -> list[str]:
        """Why the stacks richer than ``name`` that the card has were not applied."""
        if name == "none":
            return ["the model card has no stack coefficients (exported by an earlier version): "
                    "the fold ensemble's plain mean is reported; re-export the training run to "
                    "apply the T/TS stacks"]
        notes = []
        if code is None and any("sex" in s["columns"] and set(s["columns"]) - {"sex"} <= set(have)
                                for s in self.stacks.values()):
            what = "missing" if sex is None or not str(sex).strip() else f"{sex!r} is not one of F/M"
            notes.append(f"sex {what} (participants.tsv): stack {name} applied without the sex "
                         "term")
        if "cbv" not in have and any("cbv" in s["columns"] for s in self.stacks.values()):
            notes.append(f"no CBV map (see --cbv-model): stack {name} applied without the CBV branch")
        return notes

    def predict(self, std_t1w, *, sex: Any = None, cbv=None,
                cbv_source: str | None = None) -> VGGCBVPrediction:
        """Brain age of one ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``."""
        return self.predict_prepared(self.prepare(std_t1w, cbv), sex=sex, cbv_source=cbv_source)

    def gradcam(self, volume: Volume, branch: str = "t1w") -> np.ndarray:
        """Mean Grad-CAM map of a branch's fold networks on the input grid (non-negative).

        Each fold network is explained at its last convolution block
        (:class:`~bidsapp.explain.gradcam.VGGGradCAM`, MONAI's Grad-CAM without its min-max
        rescaling, so the folds' maps average in one unit).
        """
        from ..explain.gradcam import VGGGradCAM

        if branch not in self.networks:
            raise ValueError(f"branch must be one of {self.branches}, got {branch!r}")
        x = np.ascontiguousarray(volume.data, dtype=np.float32)[None, None]
        maps = [VGGGradCAM(net)(x)[0] for net in self.networks[branch]]
        return np.mean(maps, axis=0).astype(np.float32)

    def gradcam_image(self, volume: Volume, std_t1w, *, branch: str = "t1w",
                      fraction: float = GRADCAM_TOP_FRACTION):
        """The top-``fraction`` Grad-CAM map on the 2 mm template grid (MNI space).

        The mean map of :meth:`gradcam` is resampled (trilinear) from the input window onto the
        2 mm template grid, zeroed outside the participant's brain (the non-zero voxels of
        ``std_t1w``), and only its top ``fraction`` of brain voxels is kept
        (:func:`~bidsapp.explain.gradcam.top_fraction_map`).

        Parameters
        ----------
        volume : Volume
            The branch's input from :meth:`prepare`.
        std_t1w : path or nibabel image
            The MNI-space T1w the input was made from (its brain defines the mask).
        branch : str
        fraction : float

        Returns
        -------
        nibabel.Nifti1Image
            float32 on the 2 mm template grid.
        """
        from ..anat.grid import new_image
        from ..explain import map_to_grid
        from ..explain.gradcam import top_fraction_map
        from ..templates import get_template
        from ..transforms.mni_pruned import _load_on_template_grid

        grid = get_template(2.0)
        cam = map_to_grid(self.gradcam(volume, branch), volume.affine, grid.shape, grid.affine)
        brain = _load_on_template_grid(std_t1w) > 0
        return new_image(top_fraction_map(np.where(brain, cam, 0.0), fraction, mask=brain),
                         grid.affine)


def synthesise_cbv_image(std_t1w, checkpoint: str | Path, *, device: str = "cpu"):
    """CBV map of a participant synthesised by a user's CBV synthesis network (seed 003, AICBV).

    Parameters
    ----------
    std_t1w : path or nibabel image
        ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w`` (brain-masked): the grid the
        network is trained on when its pairs come from this app's derivatives
        (:func:`training.cbv_synth.find_cbv_pairs`).
    checkpoint : path
        ``cbv_synth.pt`` written by ``python -m training.cbv_synth``.
    device : str

    Returns
    -------
    nibabel.Nifti1Image
        float32 on the 2 mm template grid, in units of the brain median, zero outside the brain;
        negative values (no physical blood volume) are set to 0.

    Raises
    ------
    ModelError
        The checkpoint is missing, unreadable, not a CBV synthesis checkpoint or lacks its patch
        size.
    """
    from ..anat.grid import new_image
    from ..nets import load_cbv_synth, synthesise_cbv
    from ..templates import get_template
    from ..transforms.mni_pruned import _load_on_template_grid

    net, meta = load_cbv_synth(checkpoint, map_location=device)
    if "patch" not in meta:
        raise ModelError(f"the CBV synthesis checkpoint {checkpoint} does not record its patch "
                         "size; train it with `python -m training.cbv_synth`")
    data = _load_on_template_grid(std_t1w)
    cbv = synthesise_cbv(net, data, meta["patch"], device=device)
    return new_image(np.clip(cbv, 0.0, None), get_template(2.0).affine)


def cbv_source_label(checkpoint: str | Path) -> str:
    """How the provenance names a CBV synthesis checkpoint: file name and sha256."""
    return f"synthesised from the T1w by {Path(checkpoint).name} (sha256 {sha256_file(checkpoint)})"


def check_cbv_request(card: Mapping[str, Any] | None, cbv_model: str | Path,
                      models_folder: str | Path) -> None:
    """Refuse a CBV request that cannot be honoured, before any processing.

    Parameters
    ----------
    card : mapping or None
        The installed vgg-cbv card (``None``: no vgg-cbv model runs).
    cbv_model : path
        The ``--cbv-model`` checkpoint.
    models_folder : path
        Where the cards were looked up (named in the message).

    Raises
    ------
    ModelError
        No vgg-cbv model, a vgg-cbv card without CBV-branch weights or without a stack that uses
        them, or a file that is not a CBV synthesis checkpoint.
    """
    from ..nets import load_cbv_synth

    if card is None:
        raise ModelError(f"--cbv-model feeds the CBV branch of vgg-cbv, but no vgg-cbv model is "
                         f"installed in {models_folder}; run without --cbv-model")
    if "cbv" not in card_branches(card):
        raise ModelError(f"--cbv-model: the vgg-cbv model in {models_folder} (variant "
                         f"{card.get('variant', '?')}) has T1w-branch weights only, no CBV branch "
                         "(no paired T1w/CBV data set is public to train one); run without "
                         "--cbv-model, or install a vgg-cbv model with CBV-branch weights in "
                         "BRAINAGE_MODELS_DIR")
    if not any("cbv" in s["columns"] for s in _card_stacks(card).values()):
        raise ModelError(f"--cbv-model: the vgg-cbv model in {models_folder} has CBV-branch "
                         "weights but no stack that combines them (TA or TAS coefficients); "
                         "re-export it")
    load_cbv_synth(cbv_model)


def predict_vgg_cbv(std_t1w, *, sex: Any = None, cbv_model: str | Path | None = None,
                    models_dir: str | Path | None = None, device: str = "cpu",
                    relevance_file: str | Path | None = None) -> VGGCBVPrediction:
    """Predict brain age of one MNI-space T1w with a vgg-cbv model (optionally its Grad-CAM map).

    Parameters
    ----------
    std_t1w : path
        Participant-level ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``.
    sex : str, optional
        From ``participants.tsv``; decides between the stacks with and without sex.
    cbv_model : path, optional
        CBV synthesis checkpoint: runs the CBV branch on the map it synthesises.
    models_dir : path, optional
        Models folder with the vgg-cbv card (default: the installed models).
    device : str
    relevance_file : path, optional
        Write the top-20 % Grad-CAM map of the T1w branch (2 mm template grid) here.

    Returns
    -------
    VGGCBVPrediction
    """
    predictor = VGGCBVPredictor.from_models_dir(models_dir, device=device)
    cbv = synthesise_cbv_image(std_t1w, cbv_model, device=device) if cbv_model else None
    inputs = predictor.prepare(std_t1w, cbv)
    result = predictor.predict_prepared(inputs, sex=sex,
                                        cbv_source=cbv_source_label(cbv_model) if cbv_model else None)
    if relevance_file is not None:
        Path(relevance_file).parent.mkdir(parents=True, exist_ok=True)
        predictor.gradcam_image(inputs["t1w"], std_t1w).to_filename(str(relevance_file))
    return result
