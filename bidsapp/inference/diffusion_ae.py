"""Prediction with a diffusion-ae model (seed 001): fold ensemble, MC-dropout interval, DDIM
reconstruction of the medial slice.

The model card (written by ``brainage-train`` with ``family = "diffusion-ae"``) gives the
network (``architecture.net_kwargs`` of :class:`bidsapp.nets.DiffusionAE`), the input
preparation (``input.params``, a :class:`~bidsapp.transforms.mni_slice.MNISliceSpec`), the fold
weights (sha256-checked before loading), the slices the prediction uses
(``prediction.views``), the Monte-Carlo dropout passes per fold
(``prediction.mc_dropout_samples``) and the DDIM steps of reconstructions
(``prediction.ddim_steps``).  For one participant's brain-masked 2 mm MNI-space T1w
(``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``):

1. **input**: the views are prepared with the card's spec
   (:func:`~bidsapp.transforms.mni_slice.prepare_slice_views`): view 0 is the medial axial
   slice, the paper's input; a spec with ``neighbour_slices`` adds that many slices on each
   side.  The card's ``prediction.views`` says which the model predicts from: ``"all"`` (the
   training engine's export since the held-out evaluation became the mean over the prepared
   slices: the neighbours, training augmentation, serve as test-time augmentation) or
   ``"medial"`` (cards without the key: the medial slice only);
2. **point estimate**: every fold network, in eval mode, maps each view to z_sem = s_phi(x_0)
   and z_sem to an age f_psi(z_sem); a fold's prediction is the mean over the views, the brain
   age the mean over the folds;
3. **uncertainty**: Monte-Carlo dropout in the age MLP f_psi only.  z_sem is computed once per
   fold and view (the encoder has no dropout); then ``mc_dropout_samples`` passes of f_psi are
   made per fold with its dropout layers active and its batch normalisation on the running
   statistics (eval mode), as :func:`bidsapp.nets.mc_dropout_age` does.  A pass is one
   dropout-thinned network: its mask is shared by all views of the pass, whose ages are
   averaged as in step 2 (independent masks per view would average the dropout noise away and
   narrow the interval with the number of views).  The masks come from a CPU generator seeded
   from ``(seed, fold)``, so the same seed gives the same interval on any device; with one view
   the passes are exactly those of :func:`~bidsapp.nets.mc_dropout_age`.  The 95 % interval
   is the 2.5th to 97.5th percentile of the passes of all folds pooled; their standard
   deviation is reported too.  A card without Monte-Carlo passes (``mc_dropout_samples = 0``)
   or a network without dropout falls back to the fold interval of the other families
   (:func:`~bidsapp.inference.densenet_clinical.fold_interval`), with a note;
4. **reconstruction**: the medial slice is DDIM-encoded to its stochastic code x_T (conditioned on
   z_sem) and decoded back (:func:`bidsapp.nets.ddim_encode`, :func:`bidsapp.nets.ddim_decode`,
   ``ddim_steps`` from the card unless overridden).  Only the **first fold's network** does
   this: a reconstruction costs two U-Net passes per DDIM step (200 for 100 steps, about a
   minute on one CPU thread for the paper-size network at 128^2), against one encoder pass per
   fold and view for the age, so reconstructing with every fold would multiply the node's run time by the
   number of folds for a quality check that one network already gives.  The reconstruction is
   clipped to [0, 1] (the range of the input); its absolute difference to the input and its SSIM
   and PSNR (MONAI's ``SSIMMetric`` and ``PSNRMetric``, data range 1,
   :func:`bidsapp.nets.reconstruction_quality`) are returned.  A poor reconstruction (low SSIM)
   means that the scan lies away from what the autoencoder learnt, and that its z_sem, hence its
   brain age, deserves less trust.

The three slices are written as single-slice NIfTI images in MNI space: pixel ``(i, j)`` lies
where :func:`~bidsapp.transforms.mni_slice.view_affine` puts it, and the third axis (one plane)
is given the thickness of one plane of the resampling cube.  The participant level names them
``<P>_space-MNI152NLin2009aSym_desc-diffusionae_{inputslice,reconslice,reconerrorslice}.nii.gz``
(:data:`SLICE_SUFFIXES`; no ``res-``: they lie on the slice grid, not a template resolution).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import ModelError, UsageError
from ..transforms.mni_slice import MNISliceSpec, prepare_slice_views, slice_z_mm, view_affine
from .densenet_clinical import fold_interval
from .registry import require_family
from .weights import load_card_state_dicts, network_with_state

__all__ = ["MODEL_ID", "INTERVAL_LEVEL", "SLICE_SUFFIXES", "DiffusionAEReconstruction",
           "DiffusionAEPrediction", "DiffusionAEPredictor", "predict_diffusion_ae",
           "slice_image", "card_ddim_steps", "check_ddim_request"]

LOGGER = logging.getLogger("brainage.inference")
MODEL_ID = "diffusion-ae"
#: Coverage of the Monte-Carlo dropout interval.
INTERVAL_LEVEL = 0.95
#: BIDS suffix of each written slice (custom suffixes, listed in ``.bidsignore``).
SLICE_SUFFIXES = {"input": "inputslice", "reconstruction": "reconslice",
                  "difference": "reconerrorslice"}
#: DDIM steps when a card does not give them (the training family's default).
_DEFAULT_DDIM_STEPS = 100
#: ``prediction.views`` of a card: every prepared slice, or the medial one (cards without it)
_VIEWS = ("all", "medial")


def _card_int(card: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    """``card["prediction"][key]`` as an integer >= ``minimum`` (``default`` when absent)."""
    value = (card.get("prediction") or {}).get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"model card {card.get('id')}: prediction.{key} must be an integer >= "
                         f"{minimum}, got {value!r}")
    return value


def card_ddim_steps(card: Mapping[str, Any]) -> int:
    """DDIM steps of a diffusion-ae card (``prediction.ddim_steps``; 100 when absent).

    Examples
    --------
    >>> card_ddim_steps({"prediction": {"ddim_steps": 50}}), card_ddim_steps({})
    (50, 100)
    """
    return _card_int(card, "ddim_steps", _DEFAULT_DDIM_STEPS, 1)


def _num_train_timesteps(card: Mapping[str, Any]) -> int:
    kwargs = (card.get("architecture") or {}).get("net_kwargs") or {}
    return int(kwargs.get("num_train_timesteps", 1000))


def check_ddim_request(card: Mapping[str, Any] | None, ddim_steps: int,
                       models_folder: str | Path) -> None:
    """Refuse a ``--ddim-steps`` the installed diffusion-ae model cannot take, before any work.

    Parameters
    ----------
    card : mapping or None
        The installed diffusion-ae card (``None``: no diffusion-ae model runs; nothing to check,
        the option has no effect and a warning says so).
    ddim_steps : int
        The ``--ddim-steps`` value (already checked to be >= 1 by the parser).
    models_folder : path
        Where the cards were looked up (named in the message).

    Raises
    ------
    UsageError
        More steps than the model's diffusion has timesteps.
    """
    if card is None:
        LOGGER.warning("--ddim-steps %d has no effect: no diffusion-ae model is installed in %s",
                       ddim_steps, models_folder)
        return
    total = _num_train_timesteps(card)
    if ddim_steps > total:
        raise UsageError(f"--ddim-steps {ddim_steps} exceeds the {total} diffusion timesteps of "
                         f"the diffusion-ae model in {models_folder}; use at most {total} (the "
                         f"model card's default is {card_ddim_steps(card)})")


def slice_image(data: np.ndarray, spec: MNISliceSpec, view: int = 0):
    """A prepared 2D view as a one-plane NIfTI image in MNI space.

    Parameters
    ----------
    data : ndarray, shape (size, size)
        Indexed ``[x, y]`` (RAS), as :func:`~bidsapp.transforms.mni_slice.prepare_slice_views`
        returns the views.
    spec : MNISliceSpec
    view : int
        Which view (0: the medial slice).

    Returns
    -------
    nibabel.Nifti1Image
        float32, shape ``(size, size, 1)``; the affine is :func:`view_affine` (one plane of
        the resampling cube thick).
    """
    from ..anat.grid import new_image

    data = np.asarray(data, dtype=np.float32)
    if data.shape != (spec.size, spec.size):
        raise ValueError(f"expected a ({spec.size}, {spec.size}) slice, got {data.shape}")
    return new_image(data[:, :, None], view_affine(spec, view))


@dataclass(frozen=True)
class DiffusionAEReconstruction:
    """DDIM reconstruction of the medial slice by one fold network.

    Attributes
    ----------
    fold : int
        The fold whose network encoded and decoded the slice.
    ddim_steps : int
    input_slice, reconstruction, difference : ndarray, shape (size, size)
        The prepared slice, its reconstruction clipped to [0, 1] and their absolute difference
        (float32, indexed ``[x, y]``, RAS).
    ssim, psnr : float
        SSIM and PSNR (dB) of the reconstruction against the slice (data range 1);
        ``psnr`` is ``inf`` for an exact reconstruction.
    clipped_fraction : float
        Share of pixels the decoder put outside [0, 1] (clipped).
    seconds : float
        Run time of the encoding and decoding.
    """

    fold: int
    ddim_steps: int
    input_slice: np.ndarray = field(repr=False)
    reconstruction: np.ndarray = field(repr=False)
    difference: np.ndarray = field(repr=False)
    ssim: float
    psnr: float
    clipped_fraction: float
    seconds: float

    def images(self, spec: MNISliceSpec) -> dict[str, Any]:
        """The three slices as NIfTI images (:func:`slice_image`), keyed by their BIDS suffix."""
        return {SLICE_SUFFIXES["input"]: slice_image(self.input_slice, spec),
                SLICE_SUFFIXES["reconstruction"]: slice_image(self.reconstruction, spec),
                SLICE_SUFFIXES["difference"]: slice_image(self.difference, spec)}

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable numbers (PSNR ``None`` when infinite)."""
        return {"fold": self.fold, "ddim_steps": self.ddim_steps, "ssim": self.ssim,
                "psnr_db": self.psnr if math.isfinite(self.psnr) else None,
                "mean_abs_difference": float(np.mean(self.difference)),
                "clipped_fraction": self.clipped_fraction, "seconds": self.seconds}


@dataclass(frozen=True)
class DiffusionAEPrediction:
    """Result for one MNI-space T1w.

    Attributes
    ----------
    brain_age : float
        Mean over the folds of each fold network's prediction (eval mode, mean over the views;
        years).
    lower, upper : float
        95 % interval: percentiles 2.5 and 97.5 of the pooled Monte-Carlo dropout passes
        (``interval == "mc-dropout"``), else the fold interval (``"fold-spread"``).
    mc_sd : float
        Standard deviation of the pooled Monte-Carlo passes (NaN without them).
    mc_mean : float
        Their mean (NaN without them).
    folds : tuple of int
    fold_predictions : tuple of float
        Each fold network's prediction, eval mode (mean over the views).
    fold_mc_means, fold_mc_sds : tuple of float
        Mean and SD of each fold's passes (empty without them).
    mc_samples : int
        Passes per fold (0: none).
    seed : int
        Seed of the dropout masks.
    interval : str
        ``mc-dropout`` or ``fold-spread``.
    slice_z_mm : float
        MNI z of the medial slice.
    views_z_mm : tuple of float
        MNI z of every view predicted from (the medial slice first).
    reconstruction : DiffusionAEReconstruction or None
    notes : tuple of str
        Why the interval is not the Monte-Carlo one, when it is not.
    cv_reconstruction : dict or None
        The card's held-out reconstruction quality (``reconstruction``), for comparison.
    """

    brain_age: float
    lower: float
    upper: float
    mc_sd: float
    mc_mean: float
    folds: tuple[int, ...]
    fold_predictions: tuple[float, ...]
    fold_mc_means: tuple[float, ...]
    fold_mc_sds: tuple[float, ...]
    mc_samples: int
    seed: int
    interval: str
    slice_z_mm: float
    views_z_mm: tuple[float, ...] = ()
    reconstruction: DiffusionAEReconstruction | None = None
    notes: tuple[str, ...] = ()
    cv_reconstruction: dict[str, Any] | None = field(default=None, repr=False)

    def provenance(self) -> dict[str, Any]:
        """What produced the row, for the ``_brainage.json`` sidecar (JSON-serialisable)."""
        out: dict[str, Any] = {
            "Folds": list(self.folds), "FoldPredictions": list(self.fold_predictions),
            "Interval": ("2.5th-97.5th percentile of Monte-Carlo dropout passes of the age MLP, "
                         "all folds pooled" if self.interval == "mc-dropout" else
                         "fold spread: mean +/- t(0.975, K-1) * SD * sqrt(1 + 1/K)"),
            "MCDropoutSamplesPerFold": self.mc_samples, "MCDropoutSeed": self.seed,
            "MCDropoutSD": _finite(self.mc_sd), "MCDropoutMean": _finite(self.mc_mean),
            "SliceZmm": self.slice_z_mm, "ViewsZmm": list(self.views_z_mm),
            "Notes": list(self.notes)}
        if self.reconstruction is not None:
            rec = self.reconstruction
            out["Reconstruction"] = {"Fold": rec.fold, "DDIMSteps": rec.ddim_steps,
                                     "SSIM": rec.ssim, "PSNR": _finite(rec.psnr),
                                     "MeanAbsDifference": float(np.mean(rec.difference))}
            if self.cv_reconstruction:
                out["Reconstruction"]["CrossValidation"] = dict(self.cv_reconstruction)
        return out

    def details(self) -> dict[str, Any]:
        """JSON-serialisable details for the prediction record."""
        return {"folds": list(self.folds), "fold_predictions": list(self.fold_predictions),
                "interval": self.interval, "mc_samples": self.mc_samples, "seed": self.seed,
                "mc_sd": _finite(self.mc_sd), "mc_mean": _finite(self.mc_mean),
                "fold_mc_means": list(self.fold_mc_means),
                "fold_mc_sds": list(self.fold_mc_sds), "slice_z_mm": self.slice_z_mm,
                "views_z_mm": list(self.views_z_mm),
                "notes": list(self.notes),
                "reconstruction": (self.reconstruction.summary()
                                   if self.reconstruction is not None else None)}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _fold_seed(seed: int, fold: int) -> int:
    """Seed of one fold's dropout masks, from the run's seed and the fold (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


@torch.no_grad()
def _mc_passes(net, z: torch.Tensor, samples: int, generator: torch.Generator) -> np.ndarray:
    """``samples`` passes of f_psi on the z_sem of a scan's views, dropout active, batch norm in
    eval mode; each pass is the mean over the views of one dropout-thinned f_psi.

    The masks are drawn as :func:`bidsapp.nets.mc_dropout_age` draws them for one image (one
    uniform per unit and pass, on the CPU, kept where >= p, scaled by 1 / (1 - p)) and shared by
    the views, so for one view and the same generator the passes are that function's.

    Parameters
    ----------
    net : DiffusionAE
        In eval mode.
    z : Tensor, shape (views, latent_dim)
    samples : int
    generator : torch.Generator

    Returns
    -------
    ndarray, shape (samples,)
        Ages in years.
    """
    draws = []
    for _ in range(samples):
        h = z
        for layer in net.age_head:
            if isinstance(layer, torch.nn.Dropout) and layer.p > 0:
                keep = torch.rand((1, *h.shape[1:]), generator=generator,
                                  device="cpu").to(h.device)
                h = h * (keep >= layer.p).to(h.dtype) / (1.0 - layer.p)
            else:
                h = layer(h)  # batch norm: the network is in eval mode (running statistics)
        draws.append(net.scaled(h)[:, 0].double().mean().cpu())
    return torch.stack(draws).numpy()


class DiffusionAEPredictor:
    """The fold networks of a diffusion-ae card, ready to predict and reconstruct.

    Parameters
    ----------
    card : mapping
        Parsed model card.
    folder : path
        Folder the card's weight paths are relative to (as :func:`~.registry.read_card` gives).
    device : str
        Torch device.
    mc_samples : int, optional
        Monte-Carlo dropout passes per fold (default: the card's
        ``prediction.mc_dropout_samples``); 0 gives the fold interval.
    ddim_steps : int, optional
        DDIM steps of the reconstruction (default: the card's ``prediction.ddim_steps``).

    Raises
    ------
    ModelError
        A card of another family, an incomplete or invalid card, tampered or missing weights.
    ValueError
        ``mc_samples`` or ``ddim_steps`` out of range.
    """

    def __init__(self, card: Mapping[str, Any], folder: str | Path, device: str = "cpu", *,
                 mc_samples: int | None = None, ddim_steps: int | None = None) -> None:
        from ..nets import DiffusionAE

        require_family(card, MODEL_ID)
        self.card = dict(card)
        self.device = torch.device(device)
        try:
            self.spec = MNISliceSpec.from_dict(card["input"]["params"])
            kwargs = dict(card["architecture"]["net_kwargs"])
            folds = [int(w["fold"]) for w in card["weights"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card {card.get('id')} is incomplete or invalid: {exc}") from exc
        card_samples = _card_int(card, "mc_dropout_samples", 0, 0)
        if card_samples == 1:
            raise ModelError(f"model card {card.get('id')}: prediction.mc_dropout_samples must be "
                             "0 (off) or >= 2, got 1")
        self.views = str((card.get("prediction") or {}).get("views", "medial"))
        if self.views not in _VIEWS:
            raise ModelError(f"model card {card.get('id')}: prediction.views must be one of "
                             f"{list(_VIEWS)}, got {self.views!r}")
        self.mc_samples = card_samples if mc_samples is None else mc_samples
        self.ddim_steps = card_ddim_steps(card) if ddim_steps is None else ddim_steps
        for name, value, low in (("mc_samples", self.mc_samples, 0),
                                 ("ddim_steps", self.ddim_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low \
                    or name == "mc_samples" and value == 1:
                raise ValueError(f"{name} must be an integer >= {low}"
                                 f"{' other than 1' if name == 'mc_samples' else ''}, got {value!r}")
        states = load_card_state_dicts(card, folder)
        pairs = sorted(zip(folds, states), key=lambda item: item[0])
        self.folds = [fold for fold, _ in pairs]
        self.networks = [network_with_state(DiffusionAE(**kwargs), state, self.device,
                                            f"weights of {card.get('id')} (fold {fold})")
                         for fold, state in pairs]
        total = self.networks[0].num_train_timesteps
        if self.ddim_steps > total:
            raise ValueError(f"ddim_steps ({self.ddim_steps}) cannot exceed the model's "
                             f"{total} diffusion timesteps")
        if self.spec.size % self.networks[0].downsampling:
            raise ModelError(f"model card {card.get('id')}: input size {self.spec.size} is not a "
                             f"multiple of {self.networks[0].downsampling}")

    @classmethod
    def from_models_dir(cls, models_dir: str | Path | None = None, device: str = "cpu",
                        **kwargs: Any) -> "DiffusionAEPredictor":
        """Load the diffusion-ae card of ``models_dir`` (default: the registry's folder).

        ``kwargs`` go to the constructor (``mc_samples``, ``ddim_steps``).
        """
        from .registry import read_card

        card, folder = read_card(MODEL_ID, models_dir)
        return cls(card, folder, device=device, **kwargs)

    @property
    def has_dropout(self) -> bool:
        """Whether the age MLP has dropout to sample from."""
        return any(isinstance(m, torch.nn.Dropout) and m.p > 0
                   for m in self.networks[0].age_head)

    def prepare(self, std_t1w) -> list[np.ndarray]:
        """The views the model predicts from, of ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``.

        Returns
        -------
        list of ndarray, each of shape (size, size)
            float32 in [0, 1], indexed ``[x, y]`` (RAS); the medial slice first, then its
            neighbours when the card's ``prediction.views`` is ``"all"``.
        """
        views = prepare_slice_views(std_t1w, self.spec)
        return views if self.views == "all" else views[:1]

    def _tensor(self, planes) -> torch.Tensor:
        """(views, 1, size, size) on the device, from one plane or a sequence of planes."""
        x = np.ascontiguousarray(np.asarray(planes, dtype=np.float32))
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.spec.size, self.spec.size) or not len(x):
            raise ValueError(f"expected ({self.spec.size}, {self.spec.size}) slices, got shape "
                             f"{x.shape}")
        return torch.from_numpy(x)[:, None].to(self.device)

    @torch.no_grad()
    def predict_prepared(self, views, *, seed: int = 0,
                         reconstruct: bool = True) -> DiffusionAEPrediction:
        """Prediction (and reconstruction) from the views made by :meth:`prepare`.

        Parameters
        ----------
        views : sequence of ndarray, or one ndarray, each (size, size)
            The medial slice first (the one reconstructed).
        seed : int
            Seed of the dropout masks (the same seed, the same interval).
        reconstruct : bool
            Also DDIM-reconstruct the medial slice with the first fold's network.
        """
        x = self._tensor(views)
        fold_preds, fold_means, fold_sds, passes = [], [], [], []
        use_mc = self.mc_samples >= 2 and self.has_dropout
        for fold, net in zip(self.folds, self.networks):
            net.eval()
            z = net.encode(x)  # once per fold and view: the encoder has no dropout
            fold_preds.append(float(net.age_from_latent(z)[:, 0].double().mean()))
            if use_mc:
                generator = torch.Generator().manual_seed(_fold_seed(seed, fold))
                draws = _mc_passes(net, z, self.mc_samples, generator)
                passes.append(draws)
                fold_means.append(float(draws.mean()))
                fold_sds.append(float(draws.std(ddof=1)))
        brain_age = float(np.mean(fold_preds))
        notes = []
        if use_mc:
            pooled = np.concatenate(passes)
            tail = 100 * (1 - INTERVAL_LEVEL) / 2
            lower, upper = (float(v) for v in np.percentile(pooled, [tail, 100 - tail]))
            mc_sd, mc_mean, interval = float(pooled.std(ddof=1)), float(pooled.mean()), "mc-dropout"
        else:
            _, lower, upper = fold_interval(fold_preds, INTERVAL_LEVEL)
            mc_sd = mc_mean = float("nan")
            interval = "fold-spread"
            notes.append("the age MLP has no dropout" if not self.has_dropout else
                         "the model card sets no Monte-Carlo dropout passes "
                         "(prediction.mc_dropout_samples = 0)")
            notes[-1] += ": the 95 % interval is the fold spread"
            LOGGER.info("diffusion-ae: %s", notes[-1])
        recon = self.reconstruct(x[0, 0].cpu().numpy()) if reconstruct else None
        z_mm = slice_z_mm(self.spec)
        return DiffusionAEPrediction(
            brain_age=brain_age, lower=lower, upper=upper, mc_sd=mc_sd, mc_mean=mc_mean,
            folds=tuple(self.folds), fold_predictions=tuple(fold_preds),
            fold_mc_means=tuple(fold_means), fold_mc_sds=tuple(fold_sds),
            mc_samples=self.mc_samples if use_mc else 0, seed=int(seed), interval=interval,
            slice_z_mm=z_mm[0], views_z_mm=tuple(z_mm[:x.shape[0]]), reconstruction=recon,
            notes=tuple(notes),
            cv_reconstruction=self.card.get("reconstruction") if isinstance(
                self.card.get("reconstruction"), Mapping) else None)

    @torch.no_grad()
    def reconstruct(self, plane: np.ndarray, *, ddim_steps: int | None = None
                    ) -> DiffusionAEReconstruction:
        """DDIM encoding and decoding of the slice by the first fold's network.

        Parameters
        ----------
        plane : ndarray, shape (size, size)
            The medial slice (the first view of :meth:`prepare`).
        ddim_steps : int, optional
            Default: the predictor's (the card's unless overridden).
        """
        from ..nets import ddim_decode, ddim_encode, reconstruction_quality

        steps = self.ddim_steps if ddim_steps is None else ddim_steps
        net = self.networks[0]
        x = self._tensor(plane)
        t0 = time.perf_counter()
        code = ddim_encode(net, x, steps)
        raw = ddim_decode(net, code.x_T, code.z_sem, steps)
        seconds = time.perf_counter() - t0
        quality = reconstruction_quality(raw, x)
        raw = raw.float().cpu()
        recon = raw.clamp(0.0, 1.0)
        clipped = float(((raw < 0) | (raw > 1)).float().mean())
        source = x.float().cpu()
        return DiffusionAEReconstruction(
            fold=self.folds[0], ddim_steps=int(steps),
            input_slice=source[0, 0].numpy().copy(), reconstruction=recon[0, 0].numpy().copy(),
            difference=(recon - source).abs()[0, 0].numpy().copy(),
            ssim=float(quality["ssim"][0]), psnr=float(quality["psnr"][0]),
            clipped_fraction=clipped, seconds=seconds)

    def predict(self, std_t1w, *, seed: int = 0, reconstruct: bool = True) -> DiffusionAEPrediction:
        """Brain age of one ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``."""
        return self.predict_prepared(self.prepare(std_t1w), seed=seed, reconstruct=reconstruct)


def predict_diffusion_ae(std_t1w, *, models_dir: str | Path | None = None, device: str = "cpu",
                         seed: int = 0, mc_samples: int | None = None,
                         ddim_steps: int | None = None,
                         slices_dir: str | Path | None = None) -> DiffusionAEPrediction:
    """Predict brain age of one MNI-space T1w with a diffusion-ae model.

    Parameters
    ----------
    std_t1w : path
        Participant-level ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w``.
    models_dir : path, optional
        Models folder with the diffusion-ae card (default: the installed models).
    device : str
    seed : int
        Seed of the Monte-Carlo dropout masks.
    mc_samples, ddim_steps : int, optional
        Override the card's values.
    slices_dir : path, optional
        Write the input slice, its reconstruction and their absolute difference here
        (``<suffix>.nii.gz`` for each of :data:`SLICE_SUFFIXES`).

    Returns
    -------
    DiffusionAEPrediction
    """
    predictor = DiffusionAEPredictor.from_models_dir(models_dir, device=device,
                                                     mc_samples=mc_samples, ddim_steps=ddim_steps)
    result = predictor.predict(std_t1w, seed=seed)
    if slices_dir is not None:
        Path(slices_dir).mkdir(parents=True, exist_ok=True)
        for suffix, img in result.reconstruction.images(predictor.spec).items():
            img.to_filename(str(Path(slices_dir) / f"{suffix}.nii.gz"))
    return result
