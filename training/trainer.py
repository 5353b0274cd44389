"""The hooks-style trainer (nnU-Net-like): one fold of one model family.

``run`` is a short loop over the hooks ``initialize``, ``on_train_start``, ``on_epoch_start``,
``train_step``, ``validation_step``, ``on_epoch_end`` and ``on_train_end``; a variant subclasses
:class:`Trainer` and overrides one hook (pass it as ``trainer_cls`` to
:func:`training.run.run_training`).

Reproducibility: the shuffling of an epoch and the augmentation of each sample come from
generators seeded by ``(seed, fold, epoch[, sample])``, never from global state.  A resumed run
therefore replays exactly what an uninterrupted run would have done, and DDP ranks draw the
same augmentation for a sample as a single process would.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import InputCache, ScanRecord
from .distributed import DistContext
from .families import ModelFamily

__all__ = ["Trainer", "L1Trainer", "CHECKPOINT_FORMAT"]

LOGGER = logging.getLogger("brainage.training")
CHECKPOINT_FORMAT = 1
_CSV_FIELDS = ("epoch", "train_loss", "val_loss", "val_mae", "lr", "seconds")


class Trainer:
    """Train one fold.

    Parameters
    ----------
    config : TrainConfig
    family : ModelFamily
    cache : InputCache
        Prepared views of every scan in ``train`` and ``val``.
    train, val : sequence of ScanRecord
    fold : int
    out_dir : Path
        Folder of this fold (checkpoints, ``metrics.csv``).
    dist : DistContext
    resume : bool
        Continue from ``checkpoint_latest.pt`` (or return at once when ``checkpoint_final.pt``
        exists).
    init_state : dict, optional
        Weights to start from (fine-tuning); the output scaling stored in them is kept.
    """

    def __init__(self, config: TrainConfig, family: ModelFamily, cache: InputCache,
                 train: Sequence[ScanRecord], val: Sequence[ScanRecord], fold: int, out_dir: Path,
                 dist: DistContext, *, resume: bool = False,
                 init_state: dict[str, Any] | None = None) -> None:
        if not train or not val:
            raise ValueError(f"fold {fold}: train and val must not be empty "
                             f"(got {len(train)}, {len(val)})")
        self.config, self.family, self.cache = config, family, cache
        self.train_records, self.val_records = list(train), list(val)
        self.fold, self.out_dir, self.dist = fold, Path(out_dir), dist
        self.resume, self.init_state = resume, init_state
        self.device = dist.device
        self.start_epoch = 0
        self.best_metric = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.rows: list[dict[str, float]] = []
        self.should_stop = False
        self.finished = False
        self.use_amp = bool(config.runtime.amp and self.device.type == "cuda")

    # ------------------------------------------------------------------ paths
    @property
    def latest_path(self) -> Path:
        """Checkpoint written after every epoch."""
        return self.out_dir / "checkpoint_latest.pt"

    @property
    def best_path(self) -> Path:
        """Weights of the epoch with the lowest validation MAE."""
        return self.out_dir / "checkpoint_best.pt"

    @property
    def final_path(self) -> Path:
        """Checkpoint of the last epoch (the run is complete when it exists)."""
        return self.out_dir / "checkpoint_final.pt"

    # ------------------------------------------------------------------ hooks
    def initialize(self) -> None:
        """Seed, build the network, set its output scaling, wrap for DDP, make the optimiser."""
        seed = self.config.seed
        torch.manual_seed(seed * 1000 + self.fold)
        if self.config.runtime.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.network = self.family.build_network()
        if self.init_state is not None:
            self.network.load_state_dict(self.init_state)
        elif hasattr(self.network, "set_target_scaling"):
            ages = np.array([r.age for r in self.train_records], dtype=float)
            self.network.set_target_scaling(float(ages.mean()), float(max(ages.std(), 1.0)))
        self.network.to(self.device)
        if self.config.runtime.channels_last:
            self.network.to(memory_format=torch.channels_last_3d)
        self.model: nn.Module = self.network
        if self.dist.distributed:
            if self.device.type == "cuda":
                self.network = nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
            self.model = nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer, self.scheduler = self.configure_optimizers()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def configure_optimizers(self):
        """Adam and halving of the learning rate on a validation-loss plateau (seed 004)."""
        opt = self.config.optim
        optimizer = torch.optim.Adam(self.network.parameters(), lr=opt.lr, betas=opt.betas,
                                     weight_decay=opt.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=opt.plateau_factor, patience=opt.plateau_patience)
        return optimizer, scheduler

    def on_train_start(self) -> None:
        """Load the latest checkpoint when resuming; rewrite the metrics log to match it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume and self.final_path.is_file():
            LOGGER.info("fold %d already finished (%s)", self.fold, self.final_path)
            self.finished = True
            return
        if self.resume and self.latest_path.is_file():
            self.load_checkpoint(self.latest_path)
            LOGGER.info("fold %d: resuming after epoch %d", self.fold, self.start_epoch - 1)
        elif self.resume:
            LOGGER.info("fold %d: nothing to resume, starting from scratch", self.fold)
        self._write_csv()

    def on_epoch_start(self, epoch: int) -> None:
        """Put the network in training mode."""
        self.model.train()
        self._epoch_t0 = time.perf_counter()

    def train_batches(self, epoch: int):
        """This rank's share of each global batch: ``(x, y)`` tensors, augmented."""
        n = len(self.train_records)
        batch = self.config.optim.batch_size
        world = self.dist.world_size
        order = np.random.default_rng([self.config.seed, self.fold, epoch]).permutation(n)
        size = min(batch, n) // world * world
        if size < world:
            raise ValueError(f"fold {self.fold}: {n} training scans cannot feed {world} processes")
        for start in range(0, n - size + 1, size):  # incomplete last batch dropped (as drop_last)
            mine = order[start:start + size][self.dist.rank::world]
            xs, ys = [], []
            for index in mine:
                record = self.train_records[int(index)]
                rng = np.random.default_rng([self.config.seed, self.fold, epoch, int(index)])
                views = self.cache.views(record.key)
                view = views[int(rng.integers(len(views)))]
                xs.append(self.family.augment(view, rng))
                ys.append(record.age)
            x = self._layout(torch.from_numpy(np.stack(xs).astype(np.float32))[:, None])
            yield x.to(self.device), torch.tensor(ys, dtype=torch.float32)[:, None].to(self.device)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.runtime.channels_last and x.ndim == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step on the mean :meth:`loss` (errors in units of the output scale)."""
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.network.target_scale if hasattr(self.network, "target_scale") else 1.0
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            pred = self.model(x)
        loss = torch.mean(self.loss((pred.float() - y) / scale))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def loss(self, error: torch.Tensor) -> torch.Tensor:
        """Element-wise loss of the scaled errors ``(prediction - age) / target_scale``.

        The squared error (MSE); a variant overrides this hook to train on another loss, and
        the validation loss follows it.
        """
        return error ** 2

    @torch.no_grad()
    def validation_step(self, records: Sequence[ScanRecord]) -> tuple[np.ndarray, np.ndarray]:
        """Per-scan predictions (mean over views) and ages of ``records``."""
        self.network.eval()
        preds, ages = [], []
        for record in records:
            views = self.cache.views(record.key)
            x = torch.from_numpy(np.stack(views).astype(np.float32))[:, None]
            x = self._layout(x).to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                out = self.network(x).float()
            preds.append(float(out.mean()))
            ages.append(record.age)
        return np.asarray(preds), np.asarray(ages)

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """Recompute batch-norm running statistics on the un-augmented training inputs.

        Every rank passes over all training scans (first view each), so the statistics are
        identical across DDP ranks and do not depend on the epoch's random draws.
        """
        norms = [m for m in self.network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
        self.network.train()
        batch = self.config.optim.batch_size
        for start in range(0, len(self.train_records), batch):
            chunk = self.train_records[start:start + batch]
            for m in norms:  # weight each batch by its size: the running mean is the sample mean
                m.momentum = len(chunk) / (start + len(chunk))
            x = np.stack([self.cache.views(r.key)[0] for r in chunk]).astype(np.float32)
            self.network(self._layout(torch.from_numpy(x)[:, None]).to(self.device))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    def validate(self) -> dict[str, float]:
        """Validation loss and MAE over all ranks (each rank predicts its share)."""
        if self.config.optim.precise_bn:
            self.recalibrate_batchnorm()
        mine = self.val_records[self.dist.rank::self.dist.world_size]
        pred, age = self.validation_step(mine)
        scale = float(getattr(self.network, "target_scale", torch.tensor(1.0)))
        errors = torch.from_numpy(np.asarray((pred - age) / scale, dtype=np.float64))
        sums = torch.tensor([np.sum(np.abs(pred - age)), float(self.loss(errors).sum()),
                             float(len(mine))], dtype=torch.float64)
        if self.dist.distributed:
            torch.distributed.all_reduce(sums)
        return {"val_mae": float(sums[0] / sums[2]), "val_loss": float(sums[1] / sums[2])}

    def on_epoch_end(self, epoch: int, train_loss: float, val: dict[str, float]) -> None:
        """Schedule, track the best epoch, early stopping, log and checkpoint."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step(val["val_loss"])
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["val_loss"],
               "val_mae": val["val_mae"], "lr": lr,
               "seconds": round(time.perf_counter() - self._epoch_t0, 2)}
        self.rows.append(row)
        improved = val["val_mae"] < self.best_metric
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = val["val_mae"], epoch, 0
        else:
            self.bad_epochs += 1
        patience = self.config.optim.early_stopping_patience
        if patience and self.bad_epochs >= patience:
            LOGGER.info("fold %d: early stop after epoch %d (best %d)", self.fold, epoch,
                        self.best_epoch)
            self.should_stop = True
        LOGGER.info("fold %d epoch %d: train %.4f  val loss %.4f  val MAE %.2f y  lr %.2e%s",
                    self.fold, epoch, train_loss, val["val_loss"], val["val_mae"], lr,
                    "  *best*" if improved else "")
        self.start_epoch = epoch + 1
        if self.dist.is_main:
            if improved:
                self._save({"epoch": epoch, "val_mae": self.best_metric,
                            "model": self.network.state_dict()}, self.best_path)
            self.save_checkpoint(self.latest_path)
            self._write_csv()
        self.dist.barrier()

    def on_train_end(self) -> None:
        """Write the final checkpoint and drop the per-epoch one."""
        if self.dist.is_main:
            self.save_checkpoint(self.final_path)
            self.latest_path.unlink(missing_ok=True)
        self.dist.barrier()
        self.finished = True

    # ------------------------------------------------------------------ loop
    def run(self) -> "Trainer":
        """Train until ``max_epochs`` or early stopping; returns ``self``."""
        from tqdm.auto import tqdm

        self.initialize()
        self.on_train_start()
        if self.finished:
            return self
        show = self.config.runtime.progress and self.dist.is_main
        epochs = range(self.start_epoch, self.config.optim.max_epochs)
        for epoch in tqdm(epochs, desc=f"fold {self.fold}", disable=not show, leave=False):
            if self.should_stop:
                break
            self.on_epoch_start(epoch)
            losses = [self.train_step(x, y) for x, y in self.train_batches(epoch)]
            self.on_epoch_end(epoch, float(np.mean(losses)), self.validate())
        self.on_train_end()
        return self

    # ------------------------------------------------------------------ checkpoints
    def _save(self, payload: dict[str, Any], path: Path) -> None:
        tmp = path.with_suffix(".part")
        torch.save(payload, tmp)
        tmp.replace(path)

    def save_checkpoint(self, path: Path) -> None:
        """Everything needed to continue: weights, optimiser, scheduler, scaler, progress."""
        self._save({
            "format": CHECKPOINT_FORMAT, "family": self.family.name, "fold": self.fold,
            "trainer": type(self).__name__,
            "init_args": {"model": self.family.model_params, "input": self.family.input_params},
            "epoch": self.start_epoch, "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "best_metric": self.best_metric,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "should_stop": self.should_stop, "rows": self.rows,
            "torch_rng": torch.get_rng_state()}, path)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (``weights_only`` load)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("family") != self.family.name:
            raise ValueError(f"{path} is not a {self.family.name} checkpoint of format "
                             f"{CHECKPOINT_FORMAT}")
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.should_stop = bool(state.get("should_stop", False))
        self.rows = list(state["rows"])
        torch.set_rng_state(state["torch_rng"].cpu())

    def _write_csv(self) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)


class L1Trainer(Trainer):
    """:class:`Trainer` minimising the absolute error (MAE), as seed 003 trained its VGG8."""

    def loss(self, error: torch.Tensor) -> torch.Tensor:
        """Absolute scaled error."""
        return error.abs()
