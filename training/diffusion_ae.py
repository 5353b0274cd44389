"""Training of the diffusion-ae family (seed 001): joint diffusion and age loss, hidden ages.

* :class:`DiffusionAEFamily` (registered as ``diffusion-ae``) builds
  :class:`bidsapp.nets.DiffusionAE` from ``[model]`` and prepares the medial axial slice of the
  participant-level MNI-space T1w (:mod:`bidsapp.transforms.mni_slice`) from ``[input]``.
  Neighbouring slices, when configured, are further views of which training draws one per
  scan and epoch.  Validation (early stopping) uses the medial slice only; the held-out
  evaluation, like the app, predicts the mean over all prepared slices (test-time
  augmentation) and also records the medial slice alone.
* :class:`DiffusionAETrainer` overrides ``train_step`` with the paper's objective: the noise
  MSE (eq. 4, conditioned on z_sem) plus ``age_loss_weight`` times the age MSE (eq. 6, in
  units of the output scale), all three networks trained at once.  A scan whose age is NaN
  contributes the diffusion term only.
* **The semi-supervision experiment.**  ``hide_age_fraction`` hides the ages of that share of
  each fold's training participants (:func:`hidden_age_participants`: a systematic sample
  along the age order, so the labelled and the hidden part cover the same ages; it depends
  only on the fold's training participants and ``hide_age_seed``).  With
  ``unlabelled = "use"`` the hidden scans stay in training without their ages, i.e. the
  labelled part plus the unlabelled part.  With ``"drop"`` they are left out, i.e. the
  labelled part alone.  Two configs that differ only in ``unlabelled`` therefore train on
  the same labelled scans (``training/configs/diffusion-ae-semisup-*.toml``).  The hidden
  ages never reach the output scaling, the loss or the validation: validation and test scans
  keep their ages.  Each fold folder gets an ``age_labels.json`` listing what was hidden.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bidsapp.errors import UsageError

from .data import ScanRecord
from .families import ModelFamily, mni_t1w_path, register_family
from .trainer import Trainer

__all__ = ["DiffusionAEFamily", "DiffusionAETrainer", "hidden_age_participants"]

LOGGER = logging.getLogger("brainage.training")
_TERM_FIELDS = ("epoch", "diffusion", "age", "labelled_fraction")


def hidden_age_participants(records: Sequence[ScanRecord], fraction: float,
                            seed: int = 0) -> set[str]:
    """Participants whose ages are hidden: a systematic sample of ``fraction`` along age.

    The participants are ordered by age (first scan by key), with ties broken by a hash of
    ``seed`` and the label.  Participant ``i`` of that order is hidden when
    ``floor((i + 1) f + u) > floor(i f + u)``, where ``u`` is drawn in [0, 1) from ``seed``.
    This hides ``floor(n f + u)`` of ``n`` participants, spread evenly over the ages (every
    other one for ``f = 1/2``).

    Parameters
    ----------
    records : sequence of ScanRecord
        Training scans of one fold.
    fraction : float
        In [0, 1).
    seed : int

    Returns
    -------
    set of str
        Participant labels.

    Examples
    --------
    >>> from pathlib import Path
    >>> recs = [ScanRecord(f"sub-{p}", p, Path("t"), Path("m"), a)
    ...         for p, a in zip("abcdef", [30, 20, 60, 50, 40, 10])]
    >>> sorted(hidden_age_participants(recs, 0.5, seed=0))  # age order f b a e d c: every other
    ['a', 'd', 'f']
    >>> hidden_age_participants(recs, 0.0)
    set()
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    first: dict[str, float] = {}
    for record in sorted(records, key=lambda r: r.key):
        first.setdefault(record.participant, float(record.age))
    if fraction == 0 or not first:
        return set()
    order = sorted(first, key=lambda p: (first[p], zlib.crc32(f"{seed}:{p}".encode())))
    u = float(np.random.default_rng([int(seed), 1]).random())
    return {p for i, p in enumerate(order)
            if math.floor((i + 1) * fraction + u) > math.floor(i * fraction + u)}


class _MedialView:
    """An input cache that shows only the first view (the medial slice) of every scan."""

    def __init__(self, cache) -> None:
        self._cache = cache

    def views(self, key: str) -> list[np.ndarray]:
        return self._cache.views(key)[:1]


class DiffusionAETrainer(Trainer):
    """:class:`~training.trainer.Trainer` for the joint diffusion and age objective."""

    def __init__(self, config, family, cache, train, val, fold, out_dir, dist, *,
                 resume: bool = False, init_state: dict[str, Any] | None = None) -> None:
        self.hidden = hidden_age_participants(train, family.hide_age_fraction,
                                              family.hide_age_seed)
        labelled = [r for r in train if r.participant not in self.hidden]
        if train and not labelled:
            raise UsageError(f"fold {fold}: model.hide_age_fraction = {family.hide_age_fraction} "
                             f"hides every training participant; lower it")
        if config.optim.batch_size // dist.world_size < 2:
            raise UsageError(f"optim.batch_size {config.optim.batch_size} gives fewer than 2 scans "
                             f"per process: the batch norms of the age MLP need at least 2")
        n_train = len(train)
        if family.unlabelled == "drop":
            train = labelled
        super().__init__(config, family, cache, train, val, fold, out_dir, dist, resume=resume,
                         init_state=init_state)
        self.age_labels = {
            "hide_age_fraction": family.hide_age_fraction, "hide_age_seed": family.hide_age_seed,
            "unlabelled": family.unlabelled, "fold_train_scans": n_train,
            "labelled_scans": len(labelled),
            "unlabelled_scans_used": len(self.train_records) - len(labelled),
            "hidden_participants": sorted(self.hidden)}

    def initialize(self) -> None:
        """Build as usual, then set the output scaling from the labelled scans and hide ages.

        The base class sets the output scaling from every training age; here the scaling is
        set again from the labelled scans only, before any step, so no hidden age is used.
        """
        super().initialize()
        labelled = [r.age for r in self.train_records if r.participant not in self.hidden]
        if self.init_state is None:
            ages = np.asarray(labelled, dtype=float)
            self.network.set_target_scaling(float(ages.mean()), float(max(ages.std(), 1.0)))
        self.train_records = [dataclasses.replace(r, age=math.nan)
                              if r.participant in self.hidden else r for r in self.train_records]
        self.term_rows: list[dict[str, float]] = []
        self._terms: list[tuple[float, float, float]] = []
        LOGGER.info("fold %d: %d training scans, %d with an age (%d hidden, %s)", self.fold,
                    len(self.train_records), len(labelled),
                    len(self.train_records) - len(labelled), self.family.unlabelled)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.dist.is_main and not self.finished:
            (self.out_dir / "age_labels.json").write_text(json.dumps(self.age_labels, indent=1),
                                                          encoding="utf-8")
            path = self.out_dir / "loss_terms.csv"
            if path.is_file():  # a resumed run keeps the epochs before its checkpoint
                with open(path, encoding="utf-8") as handle:
                    self.term_rows = [{k: float(v) for k, v in row.items()}
                                      for row in csv.DictReader(handle)
                                      if int(float(row["epoch"])) < self.start_epoch]

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self._terms = []

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One Adam step on ``diffusion + age_loss_weight * age`` (see the module docstring)."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            terms = self.model(x, ages=y.reshape(-1))
        loss = terms["diffusion"].float() + self.family.age_loss_weight * terms["age"].float()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._terms.append((float(terms["diffusion"].detach()), float(terms["age"].detach()),
                            float(terms["n_labelled"]) / len(y)))
        return float(loss.detach())

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """The base class's recalibration, without a chunk of a single scan.

        The batch norms of f_psi normalise vectors, so a chunk of one scan has no variance and
        torch refuses it; a last chunk of one joins the chunk before.
        """
        norms = [m for m in self.network.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        n, batch = len(self.train_records), max(2, self.config.optim.batch_size)
        if not norms or n < 2:
            return
        bounds = list(range(0, n, batch)) + [n]
        if bounds[-1] - bounds[-2] == 1:
            del bounds[-2]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
        self.network.train()
        for start, stop in zip(bounds, bounds[1:]):
            for m in norms:  # weight each chunk by its size: the running mean is the sample mean
                m.momentum = (stop - start) / stop
            x = np.stack([self.cache.views(r.key)[0] for r in self.train_records[start:stop]])
            self.network(torch.from_numpy(x.astype(np.float32))[:, None].to(self.device))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    @torch.no_grad()
    def validation_step(self, records: Sequence[ScanRecord]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted age of each validation scan from its medial slice."""
        from .evaluate import predict_views

        views = [self.cache.views(r.key)[:1] for r in records]
        preds = predict_views(self.network, views, self.device,
                              batch_size=max(2, self.config.optim.batch_size))
        return np.asarray([p[0] for p in preds]), np.asarray([r.age for r in records])

    def on_epoch_end(self, epoch: int, train_loss: float, val: dict[str, float]) -> None:
        if self._terms:
            diffusion, age, labelled = (float(np.mean(v)) for v in zip(*self._terms))
            self.term_rows.append({"epoch": epoch, "diffusion": diffusion, "age": age,
                                   "labelled_fraction": labelled})
            LOGGER.info("fold %d epoch %d: diffusion loss %.4f, age loss %.4f", self.fold, epoch,
                        diffusion, age)
        super().on_epoch_end(epoch, train_loss, val)
        if self.dist.is_main:
            with open(self.out_dir / "loss_terms.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=_TERM_FIELDS)
                writer.writeheader()
                writer.writerows(self.term_rows)


@register_family
class DiffusionAEFamily(ModelFamily):
    """Seed 001 (Ijishakin et al.): semi-supervised diffusion autoencoder on the medial slice.

    ``[model]`` holds the network keys of :class:`bidsapp.nets.DiffusionAE` (``channels``,
    ``num_res_blocks``, ``resblock_updown``, ``attention_blocks``, ``attention_head_channels``,
    ``norm_num_groups``, ``embed_dim``, ``latent_dim``, ``age_hidden``, ``age_dropout``,
    ``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``).  It also holds
    the training keys ``age_loss_weight`` (1), ``hide_age_fraction`` (0), ``hide_age_seed`` (0)
    and ``unlabelled`` (``"use"`` or ``"drop"``), and the inference keys ``mc_samples``
    (Monte-Carlo dropout passes for the interval, 0 = off) and ``ddim_steps`` (DDIM steps for
    reconstructions and interpolations).  ``[input]`` holds
    :class:`bidsapp.transforms.mni_slice.MNISliceSpec` keys.
    """

    name = "diffusion-ae"
    seed_paper = ("Ijishakin et al., Semi-supervised diffusion model for brain age prediction "
                  "(2023): diffusion autoencoder with an age MLP on z_sem, medial axial T1w "
                  "slices (seed 001)")
    _NET_KEYS = {"channels", "num_res_blocks", "resblock_updown", "attention_blocks",
                 "attention_head_channels", "norm_num_groups", "embed_dim", "latent_dim",
                 "age_hidden", "age_dropout", "num_train_timesteps", "beta_schedule",
                 "beta_start", "beta_end"}
    _RUN_KEYS = {"age_loss_weight", "hide_age_fraction", "hide_age_seed", "unlabelled",
                 "mc_samples", "ddim_steps"}

    def __init__(self, model_params: Mapping[str, Any], input_params: Mapping[str, Any]) -> None:
        from bidsapp.transforms.mni_slice import MNISliceSpec

        super().__init__(model_params, input_params)
        p = self.model_params
        unknown = sorted(set(p) - self._NET_KEYS - self._RUN_KEYS)
        if unknown:
            raise UsageError(f"[model] has unknown key(s) {unknown} for diffusion-ae; allowed: "
                             f"{sorted(self._NET_KEYS | self._RUN_KEYS)}")
        for key in ("channels", "age_hidden"):
            if key in p:
                p[key] = [int(v) for v in p[key]]
        try:
            self.spec = MNISliceSpec.from_dict(self.input_params)
            net = self.build_network()
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid diffusion-ae [model]/[input]: {exc}") from exc
        if self.spec.size % net.downsampling:
            raise UsageError(f"input.size {self.spec.size} must be a multiple of "
                             f"{net.downsampling} (2 ** (levels - 1) for {len(net.channels)} "
                             "U-Net levels)")
        try:
            self.age_loss_weight = float(p.get("age_loss_weight", 1.0))
            self.hide_age_fraction = float(p.get("hide_age_fraction", 0.0))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"model.age_loss_weight and model.hide_age_fraction must be "
                             f"numbers: {exc}") from exc
        self.hide_age_seed = p.get("hide_age_seed", 0)
        self.unlabelled = str(p.get("unlabelled", "use"))
        self.mc_samples = p.get("mc_samples", 0)
        self.ddim_steps = p.get("ddim_steps", 100)
        if not self.age_loss_weight >= 0:
            raise UsageError(f"model.age_loss_weight must be >= 0, got {self.age_loss_weight}")
        if not 0.0 <= self.hide_age_fraction < 1.0:
            raise UsageError(f"model.hide_age_fraction must be in [0, 1), got "
                             f"{self.hide_age_fraction}")
        if self.unlabelled not in ("use", "drop"):
            raise UsageError(f"model.unlabelled must be 'use' (hidden-age scans train the "
                             f"diffusion loss) or 'drop' (they are left out), got "
                             f"{self.unlabelled!r}")
        for key, low in (("hide_age_seed", 0), ("ddim_steps", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"model.{key} must be an integer >= {low}, got {value!r}")
        value = self.mc_samples
        if isinstance(value, bool) or not isinstance(value, int) or value == 1 or value < 0:
            raise UsageError(f"model.mc_samples must be 0 (off) or an integer >= 2, got {value!r}")
        if value and not float(p.get("age_dropout", 0.5)) > 0:
            raise UsageError("model.mc_samples > 0 needs model.age_dropout > 0")
        if self.ddim_steps > net.num_train_timesteps:
            raise UsageError(f"model.ddim_steps ({self.ddim_steps}) cannot exceed "
                             f"model.num_train_timesteps ({net.num_train_timesteps})")
        self.input_params = self.spec.to_dict()

    def net_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`bidsapp.nets.DiffusionAE` (JSON-serialisable)."""
        kwargs: dict[str, Any] = {"spatial_dims": 2, "in_channels": 1}
        for key in sorted(self._NET_KEYS):
            if key in self.model_params:
                value = self.model_params[key]
                kwargs[key] = list(value) if isinstance(value, (list, tuple)) else value
        return kwargs

    def build_network(self) -> nn.Module:
        from bidsapp.nets import DiffusionAE

        return DiffusionAE(**self.net_kwargs())

    def prepare(self, record: ScanRecord) -> list[np.ndarray]:
        from bidsapp.transforms.mni_slice import prepare_slice_views

        return prepare_slice_views(mni_t1w_path(record), self.spec)

    def prepare_robustness(self, record: ScanRecord, spacing_mm: float) -> list[np.ndarray]:
        raise NotImplementedError("diffusion-ae reads the MNI-space T1w; thick-slice robustness "
                                  "needs re-registration (set export.robustness_spacings_mm = [])")

    def augment(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # the paper trains without augmentation; the neighbouring-slice views are this family's
        return np.asarray(view, dtype=np.float32)

    def keep(self, views: list[np.ndarray]) -> bool:
        return bool(np.any(views[0] > 0))

    def trainer_class(self):
        return DiffusionAETrainer

    def evaluate_fold(self, cache, test, best_path, device, robustness_spacings=()):
        """Held-out predictions (mean over the prepared slices, and from the medial slice
        alone), reconstruction quality, and the fold's ``age_labels.json``."""
        from .export import evaluate_fold

        if robustness_spacings:
            raise UsageError("diffusion-ae has no thick-slice robustness check; set "
                             "export.robustness_spacings_mm = []")
        result = evaluate_fold(self, cache, test, best_path, device)
        medial = evaluate_fold(self, _MedialView(cache), test, best_path, device)
        result["medial_only"] = {"rows": [{"key": r["key"], "predicted": r["predicted"]}
                                          for r in medial["rows"]],
                                 "metrics": medial["metrics"]}
        result["reconstruction"] = self.reconstruction_quality(cache, test, best_path, device)
        labels = best_path.parent / "age_labels.json"
        if labels.is_file():
            result["age_labels"] = json.loads(labels.read_text(encoding="utf-8"))
        return result

    def reconstruction_quality(self, cache, test: Sequence[ScanRecord], best_path,
                               device, batch_size: int = 16) -> dict[str, Any]:
        """SSIM and PSNR of the DDIM reconstructions of the held-out medial slices.

        Each slice is encoded to (z_sem, x_T) and decoded with ``ddim_steps`` steps by the
        fold's best network (:func:`bidsapp.nets.ddim_reconstruct`), then compared with the
        slice by :func:`bidsapp.nets.reconstruction_quality`.
        """
        from bidsapp.nets import ddim_reconstruct, reconstruction_quality

        state = torch.load(best_path, map_location="cpu", weights_only=True)
        net = self.build_network()
        net.load_state_dict(state["model"])
        net.to(device).eval()
        rows = []
        for start in range(0, len(test), batch_size):
            part = test[start:start + batch_size]
            images = torch.from_numpy(np.stack([cache.views(r.key)[0] for r in part])[:, None])
            images = images.float().to(device)
            quality = reconstruction_quality(ddim_reconstruct(net, images, self.ddim_steps),
                                             images)
            rows += [{"key": r.key, "ssim": float(a), "psnr": float(b)}
                     for r, a, b in zip(part, quality["ssim"], quality["psnr"])]
        return {"ddim_steps": self.ddim_steps, "rows": rows}

    @staticmethod
    def _pooled_medial(fold_results) -> dict[str, Any] | None:
        """Pooled held-out metrics of the prediction from the medial slice alone."""
        from .evaluate import regression_metrics

        pairs = []
        for k in sorted(fold_results):
            medial = fold_results[k].get("medial_only")
            if not medial:
                return None
            ages = {r["key"]: r["age"] for r in fold_results[k]["rows"]}
            pairs += [(ages[r["key"]], r["predicted"]) for r in medial["rows"]]
        if len(pairs) < 2:
            return None
        age, predicted = zip(*pairs)
        return {"metrics": regression_metrics(age, predicted),
                "description": "held-out predictions from the medial slice alone (the paper's "
                               "input), for comparison with the shipped mean over slices"}

    def card_extras(self, fold_results) -> dict[str, Any]:
        per_fold = []
        for k in sorted(fold_results):
            labels = dict(fold_results[k].get("age_labels") or {})
            labels.pop("hidden_participants", None)
            per_fold.append({"fold": k, **labels})
        semi = {"hide_age_fraction": self.hide_age_fraction, "hide_age_seed": self.hide_age_seed,
                "unlabelled": self.unlabelled, "per_fold": per_fold,
                "rule": "a systematic sample of hide_age_fraction of each fold's training "
                        "participants along their age order (training.diffusion_ae."
                        "hidden_age_participants); 'use': their scans train the diffusion loss "
                        "only, 'drop': they are left out; validation and test scans keep ages"}
        quality = [row for k in sorted(fold_results)
                   for row in (fold_results[k].get("reconstruction") or {}).get("rows", [])]
        reconstruction = None
        if quality:
            ssim = np.array([q["ssim"] for q in quality])
            psnr = np.array([q["psnr"] for q in quality])
            sd = (lambda v: float(v.std(ddof=1)) if v.size > 1 else None)  # noqa: E731
            reconstruction = {
                "held_out_scans": len(quality), "ddim_steps": self.ddim_steps,
                "ssim_mean": float(ssim.mean()), "ssim_sd": sd(ssim),
                "psnr_db_mean": float(psnr.mean()), "psnr_db_sd": sd(psnr),
                "description": "DDIM encode + decode of each held-out medial slice by its "
                               "fold's network; SSIM and PSNR against the slice (data range 1; "
                               "bidsapp.nets.reconstruction_quality)"}
        prediction = {
            "ensemble": "mean of the fold models' predictions, each the mean over the prepared "
                        "slices: the medial axial slice and its neighbour_slices neighbours on "
                        "each side (the training augmentation's views, used as test-time "
                        "augmentation)",
            "views": "all", "mc_dropout_samples": self.mc_samples, "ddim_steps": self.ddim_steps,
            **({"interval": f"95% interval: 2.5th and 97.5th percentiles of {self.mc_samples} "
                            "Monte-Carlo dropout passes of the age MLP per fold model (z_sem "
                            "fixed, batch norm in eval mode), pooled over the fold models; it "
                            "reflects the age MLP's dropout and the fold models' disagreement, "
                            "not the error against chronological age (see metrics)"}
               if self.mc_samples else {}),
            "medial_slice_only": self._pooled_medial(fold_results)}
        return {"semi_supervision": semi, "prediction": prediction,
                "reconstruction": reconstruction}

    def architecture(self) -> dict[str, Any]:
        from bidsapp.nets import DiffusionAE

        net = self.build_network()
        count = lambda m: int(sum(q.numel() for q in m.parameters()))  # noqa: E731
        return {"class": f"{DiffusionAE.__module__}.{DiffusionAE.__name__}",
                "params": self.model_params, "net_kwargs": self.net_kwargs(),
                "n_parameters": count(net),
                "n_parameters_by_part": {"noise_predictor": count(net.noise_net),
                                         "semantic_encoder": count(net.encoder),
                                         "age_mlp": count(net.age_head)},
                "description": "diffusion autoencoder: U-Net noise predictor (MONAI diffusion "
                               "residual blocks, GroupNorm + SiLU, self-attention blocks in the "
                               "middle) conditioned on z_sem added to the time embedding; "
                               "semantic encoder = down path + middle block, pooled to z_sem; "
                               "age MLP on z_sem (ReLU, batch norm, dropout); output = "
                               "target_offset + target_scale * MLP(z_sem)",
                "loss": "noise MSE (eq. 4, one uniform timestep per scan, conditioned on z_sem) "
                        f"+ {self.age_loss_weight:g} x age MSE in units of the output scale "
                        "(eq. 6) over the scans with an age"}

    def preprocessing(self) -> dict[str, Any]:
        from bidsapp.transforms.mni_slice import slice_z_mm

        return {"function": "bidsapp.transforms.mni_slice.prepare_slice_views",
                "params": self.spec.to_dict(),
                "inputs": ["space-MNI152NLin2009aSym_res-2_desc-preproc_T1w (brain-masked)"],
                "slice_z_mm": slice_z_mm(self.spec),
                "description": (
                    "participant-level MNI-space T1w (N4, brain mask; non-linear registration, "
                    "the paper used an affine one) resampled to a grid_size^3 cube over the "
                    "template field of view; the medial axial plane (a fixed MNI z) and "
                    "neighbour_slices planes on each side (training augmentation) resized to "
                    "size^2 and min-max normalised to [0, 1] per plane")}
