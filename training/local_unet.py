"""Training of the local-unet family (seed 000): block sampling, eq. 5 loss, tiled evaluation.

* :class:`LocalUNetTrainer` overrides three hooks of :class:`~training.trainer.Trainer`:
  ``train_batches`` draws ``blocks_per_scan`` random blocks of every training scan per epoch
  (output block centred on a brain voxel, :func:`bidsapp.transforms.blocks.sample_block`);
  ``train_step`` minimises the voxelwise L1 loss on the brain voxels of the output block (target:
  the participant's age at every voxel) plus the auxiliary block-level L1 losses weighted by
  :func:`aux_loss_weights` (eq. 5 of the paper; weights decaying linearly to 0);
  ``validation_step`` gives each validation scan's global brain age: the mean over the brain
  mask of the tiled voxelwise map (``val_blocks = 0``, exactly what inference reports) or, to save
  time, the mean over the brain voxels of ``val_blocks`` fixed blocks per scan.
* :func:`evaluate_local_unet` predicts the held-out scans of a fold by full tiling: global value
  and within-participant voxel MAE (mean over the mask of ``|map - age|``).
* :func:`local_unet_card_extras` adds the voxel-level metrics and the prediction method to the
  model card.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bidsapp.inference.local_unet import tiled_age_map
from bidsapp.transforms.blocks import crop_padded, sample_block

from .data import InputCache, ScanRecord
from .evaluate import regression_metrics
from .trainer import Trainer

__all__ = ["LocalUNetTrainer", "aux_loss_weights", "input_statistics", "evaluate_local_unet",
           "local_unet_card_extras"]

LOGGER = logging.getLogger("brainage.training")


def aux_loss_weights(step: int, initial: Sequence[float], decay_steps: float) -> list[float]:
    """Weights of the auxiliary losses at optimiser step ``step`` (eq. 5: alpha_1, alpha_2 ...).

    Each starts at its initial value and decreases linearly to 0 at ``decay_steps``, after
    which only the voxel-level loss drives the gradients (the paper: after 50,000 of 500,000
    iterations).

    Examples
    --------
    >>> aux_loss_weights(0, [1.0, 0.5], 100), aux_loss_weights(50, [1.0, 0.5], 100)
    ([1.0, 0.5], [0.5, 0.25])
    >>> aux_loss_weights(100, [1.0, 0.5], 100), aux_loss_weights(150, [1.0, 0.5], 100)
    ([0.0, 0.0], [0.0, 0.0])
    """
    if decay_steps <= 0:
        return [0.0 for _ in initial]
    factor = max(0.0, 1.0 - float(step) / float(decay_steps))
    return [float(a) * factor for a in initial]


def _scan_seed(seed: int, key: str) -> list[int]:
    return [int(seed), zlib.crc32(key.encode())]


def input_statistics(views, mask: np.ndarray, floor_fraction: float = 0.2):
    """Voxelwise mean and SD of prepared inputs, the SD floored for :meth:`LocalUNet.standardize`.

    Parameters
    ----------
    views : iterable of ndarray, shape (C, X, Y, Z)
        The prepared inputs of the training scans.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask; the floor is ``floor_fraction`` x the median SD of each channel in it, so
        that voxels that hardly vary (background) are not blown up into large z-scores.
    floor_fraction : float

    Returns
    -------
    (ndarray, ndarray)
        float32 mean and SD, shape (C, X, Y, Z).

    Examples
    --------
    >>> a, b = np.zeros((1, 2, 1, 1)), np.array([[[[2.0]], [[0.0]]]])
    >>> mean, sd = input_statistics([a, b], np.ones((2, 1, 1), bool))
    >>> mean.ravel().tolist(), sd.ravel().tolist()
    ([1.0, 0.0], [1.0, 0.10000000149011612])
    """
    total = squares = None
    n = 0
    for view in views:
        v = np.asarray(view, dtype=np.float64)
        total = v.copy() if total is None else total + v
        squares = v * v if squares is None else squares + v * v
        n += 1
    if not n:
        raise ValueError("input statistics need at least one scan")
    mean = total / n
    sd = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    for c in range(sd.shape[0]):
        inside = sd[c][mask]
        floor = floor_fraction * (float(np.median(inside)) if inside.size else 0.0)
        sd[c] = np.maximum(sd[c], floor if floor > 0 else 1.0)
    return mean.astype(np.float32), sd.astype(np.float32)


class LocalUNetTrainer(Trainer):
    """:class:`~training.trainer.Trainer` for voxelwise targets and auxiliary losses.

    A network with voxelwise input statistics (``model.standardize_input``) gets them from this
    fold's training scans (a fine-tuned network keeps those it was trained with), and every
    block it is trained and validated on is cut from the z-scored input.
    """

    def initialize(self) -> None:
        super().initialize()
        family = self.family
        self._inputs: dict[str, np.ndarray] = {}
        net = self.network  # the module itself (self.model may be its DDP wrapper)
        if getattr(net, "input_shape", None) is not None and self.init_state is None:
            mean, sd = input_statistics((self.cache.views(r.key)[0] for r in self.train_records),
                                        family.mask)
            net.set_input_statistics(mean, sd)
        n_blocks = len(self.train_records) * family.blocks_per_scan
        world = self.dist.world_size
        size = min(self.config.optim.batch_size, n_blocks) // world * world
        self.steps_per_epoch = len(range(0, n_blocks - size + 1, size)) if size else 0
        self.aux_decay_steps = family.aux_decay_epochs * self.steps_per_epoch
        self.step = 0

    def _input(self, key: str) -> np.ndarray:
        """The network's input for one cached scan (z-scored when the network standardizes)."""
        if key not in self._inputs:
            self._inputs[key] = self.network.standardize(self.cache.views(key)[0])
        return self._inputs[key]

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        # the step count follows from the epoch, so a resumed run continues the same schedule
        self.step = epoch * self.steps_per_epoch

    def train_batches(self, epoch: int):
        """This rank's share of each batch: input blocks, ``(ages, output-block brain masks)``."""
        family = self.family
        n = len(self.train_records)
        n_blocks = n * family.blocks_per_scan
        world = self.dist.world_size
        order = np.random.default_rng([self.config.seed, self.fold, epoch]).permutation(n_blocks)
        size = min(self.config.optim.batch_size, n_blocks) // world * world
        if size < world:
            raise ValueError(f"fold {self.fold}: {n_blocks} training blocks cannot feed {world} "
                             "processes")
        for start in range(0, n_blocks - size + 1, size):  # incomplete last batch dropped
            xs, ages, masks = [], [], []
            for item in order[start:start + size][self.dist.rank::world]:
                record = self.train_records[int(item) % n]
                rng = np.random.default_rng([self.config.seed, self.fold, epoch, int(item)])
                x, target, _ = sample_block(self._input(record.key), family.mask, rng,
                                            family.in_size, family.out_size, family.mask_voxels)
                xs.append(x.astype(np.float32))
                ages.append(record.age)
                masks.append(target)
            x = torch.from_numpy(np.stack(xs)).to(self.device)
            age = torch.tensor(ages, dtype=torch.float32, device=self.device)
            mask = torch.from_numpy(np.stack(masks)[:, None]).to(self.device)
            yield x, (age, mask)

    def train_step(self, x: torch.Tensor, y) -> float:
        """One Adam step on eq. 5: voxel L1 on brain voxels + decaying auxiliary L1 (years)."""
        age, mask = y
        weights = aux_loss_weights(self.step, self.family.aux_weights, self.aux_decay_steps)
        self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            voxel, aux = self.model(x, return_aux=True)
        target = age.view(-1, 1, 1, 1, 1)
        weight = mask.float()
        loss = torch.sum(torch.abs(voxel.float() - target) * weight) / weight.sum().clamp(min=1.0)
        for w, block in zip(weights, aux):
            # DDP needs every parameter in the graph; one process leaves decayed heads out
            if w > 0 or self.dist.distributed:
                loss = loss + w * torch.mean(torch.abs(block.float()[:, 0] - age))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def _fixed_blocks(self, key: str) -> np.ndarray:
        """``val_blocks`` tiles of the mask, the same for a scan in every epoch."""
        origins = self.family.tiles
        rng = np.random.default_rng(_scan_seed(self.config.seed, key))
        chosen = rng.choice(len(origins), size=min(self.family.val_blocks, len(origins)),
                            replace=False)
        return origins[np.sort(chosen)]

    @torch.no_grad()
    def validation_step(self, records: Sequence[ScanRecord]) -> tuple[np.ndarray, np.ndarray]:
        """Global brain age of each validation scan (tiled map mean, or fixed-block mean)."""
        family = self.family
        self.network.eval()
        preds, ages = [], []
        for record in records:
            data = self.cache.views(record.key)[0]
            if not family.val_blocks:
                age_map = tiled_age_map(self.network, data, family.mask, family.in_size,
                                        family.out_size, device=self.device)
                preds.append(float(np.nanmean(age_map)))
            else:
                origins = self._fixed_blocks(record.key)
                data = self._input(record.key)
                x = np.stack([crop_padded(data, o - family.margin, family.in_size)
                              for o in origins]).astype(np.float32)
                out = self.network(torch.from_numpy(x).to(self.device)).float().cpu().numpy()[:, 0]
                masks = np.stack([crop_padded(family.mask, o, family.out_size) for o in origins])
                preds.append(float(out[masks].mean()))
            ages.append(record.age)
        return np.asarray(preds), np.asarray(ages)


def _tiled_globals(net, cache: InputCache, test: Sequence[ScanRecord], family, device):
    out = []
    for record in test:
        age_map = tiled_age_map(net, cache.views(record.key)[0], family.mask, family.in_size,
                                family.out_size, stride=family.tile_stride, device=device)
        values = age_map[family.mask].astype(np.float64)
        out.append((float(values.mean()), float(np.mean(np.abs(values - record.age)))))
    return out


def evaluate_local_unet(family, cache: InputCache, test: Sequence[ScanRecord], best_path: Path,
                        device: torch.device) -> dict[str, Any]:
    """Held-out predictions of one fold with its best weights, by full tiling.

    Returns the engine's evaluation dict (``rows`` with the global ``predicted`` value,
    ``metrics``, ``fp16_max_change_years``) with ``voxel_mae`` (mean over the brain mask of
    ``|map - age|``) added to every row.
    """
    from .export import _roundtrip

    state = torch.load(best_path, map_location="cpu", weights_only=True)
    net = family.build_network()
    net.load_state_dict(state["model"])
    net.to(device).eval()
    full = _tiled_globals(net, cache, test, family, device)
    net.load_state_dict(_roundtrip(state["model"]))
    half = _tiled_globals(net, cache, test, family, device)
    rows = [{"key": r.key, "participant": r.participant, "age": r.age, "sex": r.sex,
             "predicted": g, "voxel_mae": v} for r, (g, v) in zip(test, full)]
    pred = [g for g, _ in full]
    return {"best_epoch": int(state["epoch"]), "best_val_mae": float(state["val_mae"]),
            "rows": rows,
            "metrics": regression_metrics([r.age for r in test], pred) if len(test) > 1 else {},
            "fp16_max_change_years": float(np.max(np.abs(np.subtract(pred, [g for g, _ in half]))))
            if test else 0.0}


def local_unet_card_extras(family, fold_results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Voxel-level cross-validation metrics and the prediction method, for the model card."""
    per_fold, all_mae = [], []
    for k in sorted(fold_results):
        values = [float(r["voxel_mae"]) for r in fold_results[k]["rows"]]
        all_mae += values
        if values:
            per_fold.append({"fold": k, "median_voxel_mae": float(np.median(values)),
                             "mean_voxel_mae": float(np.mean(values)), "n": len(values)})
    voxel = {"definition": "per held-out scan: mean over the template brain mask of |brain-age "
                           "map - age| (within-participant voxel MAE); summarised over scans",
             "median_within_participant_voxel_mae": float(np.median(all_mae)) if all_mae else None,
             "mean_within_participant_voxel_mae": float(np.mean(all_mae)) if all_mae else None,
             "n": len(all_mae), "per_fold": per_fold}
    blocks = family.block_geometry()
    prediction = {
        "ensemble": ("voxelwise mean over the fold networks"
                     + (f" x {blocks['mc_samples']} Monte-Carlo dropout samples each"
                        if blocks["mc_samples"] else "")
                     + f" of the tiled maps (output blocks of {blocks['out_size']} voxels, stride "
                       f"{blocks['tile_stride']}, overlaps averaged) over the template brain "
                       "mask; the global brain age is the mean of that map over the mask "
                       "(cross-validation metrics are for the global value of each fold's own "
                       "network)"),
        "interval": "95% interval of the global values of the fold x sample maps: mean +/- "
                    "t(0.975, n-1) * SD * sqrt(1 + 1/n); it reflects disagreement between folds "
                    "(and dropout samples) only, not the error against chronological age",
        "maps": "brainagemap (mean), brainagesdmap (SD over fold x sample maps), brainpadmap "
                "(mean - age), on the 2 mm template grid, NaN outside the brain mask"}
    return {"metrics": {"voxel_level": voxel}, "prediction": prediction}
