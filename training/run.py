"""``run_training``: the one code path behind ``brainage-train`` and the Python API."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bidsapp.errors import UsageError

from .config import TrainConfig
from .data import InputCache, collect_records
from .distributed import setup_distributed, teardown_distributed
from .export import export_model, ridge_cross_validation
from .families import ModelFamily, get_family
from .splits import load_or_create_splits
from .trainer import Trainer

__all__ = ["run_training", "resolve_init_from", "member_fold_dir", "constant_predictor_mae"]

#: Seed step between restarts of a stalled network (far from the members' seed offsets).
RESTART_SEED_STEP = 10_007

LOGGER = logging.getLogger("brainage.training")


def member_fold_dir(work_dir: Path, member: str, fold: int) -> Path:
    """Folder of one fold of one ensemble member (``work_dir/fold{k}`` for a single network)."""
    return Path(work_dir) / member / f"fold{fold}" if member else Path(work_dir) / f"fold{fold}"


def constant_predictor_mae(train: Sequence[Any], val: Sequence[Any]) -> float:
    """Validation MAE of predicting the mean training age for everyone (a network's start).

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> constant_predictor_mae([R(age=20.0), R(age=40.0)], [R(age=30.0), R(age=50.0)])
    10.0
    """
    mean = float(np.mean([r.age for r in train]))
    return float(np.mean([abs(r.age - mean) for r in val]))


def _stalled_attempts(folder: Path) -> list[Path]:
    return sorted(folder.parent.glob(f"{folder.name}-stalled*"),
                  key=lambda p: int(p.name.rsplit("stalled", 1)[1]))


def _train_member(trainer_cls, config: TrainConfig, member, cache, train, val, k: int, folder: Path,
                  dist, *, resume: bool, init) -> tuple[Any, list[dict[str, Any]]]:
    """Train one member on fold ``k``; retrain it from a new seed while it stalls.

    A stalled attempt is kept beside the fold folder as ``fold<k>-stalled<n>`` (its metrics
    explain the restart); a resumed run counts those folders and goes on with the next seed.
    """
    base_seed = config.seed + member.seed_offset
    constant = constant_predictor_mae(train, val)
    restarts = []
    for attempt, previous in enumerate(_stalled_attempts(folder)):
        restarts.append({"seed": base_seed + RESTART_SEED_STEP * attempt, "folder": previous.name,
                         "best_val_mae": _best_val_mae(previous / "checkpoint_best.pt")})
    while True:
        seed = base_seed + RESTART_SEED_STEP * len(restarts)
        member_config = config if seed == config.seed else dataclasses.replace(config, seed=seed)
        trainer = trainer_cls(member_config, member.family, cache, train, val, k, folder, dist,
                              resume=resume, init_state=init).run()
        best = _best_val_mae(trainer.best_path)
        if len(restarts) >= config.optim.restart_stalled or best < config.optim.stall_ratio * constant:
            break
        target = folder.with_name(f"{folder.name}-stalled{len(restarts)}")
        LOGGER.warning("fold %d%s stalled (best validation MAE %.2f y, predicting the mean: %.2f y); "
                       "retraining from seed %d", k, f" {member.name}" if member.name else "", best,
                       constant, seed + RESTART_SEED_STEP)
        dist.barrier()
        if dist.is_main:
            folder.rename(target)
        dist.barrier()
        restarts.append({"seed": seed, "folder": target.name, "best_val_mae": best})
    return trainer, [{**r, "constant_val_mae": constant} for r in restarts]


def _reused_evaluation(folder: Path) -> dict[str, Any] | None:
    """The held-out evaluation of a fold that finished before this (resumed) run, when it was
    written after the fold's final checkpoint; ``None`` when it must be computed."""
    path, final = folder / "evaluation.json", folder / "checkpoint_final.pt"
    if not (path.is_file() and final.is_file()) or path.stat().st_mtime < final.stat().st_mtime:
        return None
    LOGGER.info("%s: finished before, its held-out evaluation is reused", folder.name)
    return json.loads(path.read_text(encoding="utf-8"))


def _best_val_mae(path: Path) -> float:
    return float(torch.load(path, map_location="cpu", weights_only=True)["val_mae"])


def resolve_init_from(init_from: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Model card and checked fold weights of a shipped model id, a card path or a model folder.

    A card's weight paths are relative to the card's folder (``<id>/model_card.json``, or the
    deprecated ``<id>.json`` beside ``<id>/``).

    Raises
    ------
    UsageError
        Unknown model id.
    ModelError
        Missing or tampered weights.
    """
    from bidsapp.inference.registry import CARD_NAME, available_models, models_dir, read_card
    from bidsapp.inference.weights import load_card_state_dicts

    path = Path(init_from)
    if path.is_dir() and (path / CARD_NAME).is_file():
        path = path / CARD_NAME
    if path.suffix == ".json" and path.is_file():
        card, folder = json.loads(path.read_text(encoding="utf-8")), path.parent
    else:
        cards = available_models()
        if init_from not in cards:
            raise UsageError(f"init_from: no shipped model {init_from!r} in {models_dir()} "
                             f"(available: {', '.join(cards) or 'none'}); give a model id, a "
                             "model card path or a model folder")
        card, folder = read_card(init_from)
    return card, load_card_state_dicts(card, folder)


def _family_for(config: TrainConfig) -> tuple[ModelFamily, list[dict[str, Any]] | None, dict | None]:
    if config.init_from is None:
        return get_family(config.family, config.model, config.input), None, None
    card, states = resolve_init_from(config.init_from)
    if card.get("family") != config.family:
        raise UsageError(f"init_from {config.init_from} is a {card.get('family')!r} model, but the "
                         f"config trains {config.family!r}")
    params = {k: v for k, v in card["architecture"]["params"].items()
              if k not in ("spatial_dims", "in_channels", "out_channels")}
    if config.model and config.model != params:
        LOGGER.warning("init_from: the [model] table is ignored; the architecture of %s is used",
                       config.init_from)
    if config.input and config.input != card["input"]["params"]:
        LOGGER.warning("init_from: the [input] table is ignored; the input preparation of %s "
                       "is used", config.init_from)
    family = get_family(config.family, params, card["input"]["params"])
    origin = {"id": card.get("id"), "sha256": [w["sha256"] for w in card["weights"]],
              "training_data": card.get("training_data", {}).get("dataset")}
    return family, states, origin


def run_training(config: TrainConfig, *, folds: Sequence[int] | None = None, resume: bool = False,
                 export: bool = True, trainer_cls: type[Trainer] | None = None) -> dict[str, Any]:
    """Cross-validated training of one model family, then export of weights and card.

    Parameters
    ----------
    config : TrainConfig
    folds : sequence of int, optional
        Train only these folds (default all); export happens once every fold has finished.
    resume : bool
        Continue interrupted folds from their latest checkpoint; finished folds are kept.
    export : bool
        Write weights and card to ``config.export.models_dir`` when all folds are done.
    trainer_cls : type, optional
        A :class:`~training.trainer.Trainer` subclass (a variant overriding hooks); default the
        family's own (:meth:`~training.families.ModelFamily.trainer_class`) or ``Trainer``.

    Returns
    -------
    dict
        ``{"folds": {k: evaluation}, "card": path or None}`` (evaluations on rank 0 only; for
        an ensemble family, ``{k: {member name: evaluation}}``).
    """
    t0 = time.perf_counter()
    dist = setup_distributed(config.runtime.device)
    try:
        if config.runtime.num_threads:
            torch.set_num_threads(config.runtime.num_threads)
        if config.runtime.deterministic and dist.device.type == "cuda":
            import os

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        family, init_states, origin = _family_for(config)
        members = family.members()
        if trainer_cls is None:
            trainer_cls = family.trainer_class() or Trainer
        if init_states is not None and family.ensemble:
            raise UsageError(f"init_from is not supported for the ensemble family {family.name!r}")
        work = config.work_dir
        if dist.is_main:
            work.mkdir(parents=True, exist_ok=True)
            (work / "config.json").write_text(config.to_json(), encoding="utf-8")
        records = collect_records(config.data.bids_dir, config.data.derivatives,
                                  participant_labels=config.data.participant_labels)
        first_age: dict[str, float] = {}
        for record in sorted(records, key=lambda r: r.key):
            first_age.setdefault(record.participant, record.age)
        # one input cache per distinct input preparation (ensemble members may share one)
        caches: dict[str, InputCache] = {}
        for member in members:
            tag = member.family.cache_tag()
            caches.setdefault(tag, InputCache(work / "cache" / tag, tag, member.family.prepare))
        # rank 0 writes splits and cache; the others read what it wrote
        if dist.is_main:
            splits = load_or_create_splits(work / "splits.json", first_age, folds=config.data.folds,
                                           val_fraction=config.data.val_fraction, seed=config.seed,
                                           user_file=config.data.splits_file)
            for cache in caches.values():
                cache.load(records, progress=config.runtime.progress)
                cache.write_manifest()
        dist.barrier()
        if not dist.is_main:
            splits = load_or_create_splits(work / "splits.json", first_age, folds=config.data.folds,
                                           val_fraction=config.data.val_fraction, seed=config.seed,
                                           user_file=config.data.splits_file)
            for cache in caches.values():
                cache.load(records)
        usable = [r for r in records
                  if all(m.family.keep(caches[m.family.cache_tag()].views(r.key)) for m in members)]
        if len(usable) < len(records):
            LOGGER.warning("%d scan(s) excluded as mostly background: %s", len(records) - len(usable),
                           ", ".join(r.key for r in records if r not in usable))
        n_folds = len(splits["folds"])
        chosen = list(range(n_folds)) if folds is None else [int(k) for k in folds]
        bad = [k for k in chosen if not 0 <= k < n_folds]
        if bad:
            raise UsageError(f"fold(s) {bad} do not exist (the splits have {n_folds})")
        results: dict[int, Any] = {}
        for k in chosen:
            part = {name: set(splits["folds"][k][name]) for name in ("train", "val", "test")}
            train = [r for r in usable if r.participant in part["train"]]
            val = [r for r in usable if r.participant in part["val"]]
            test = [r for r in usable if r.participant in part["test"]]
            LOGGER.info("fold %d: %d train, %d validation, %d test scans", k, len(train), len(val),
                        len(test))
            if not train or not val:
                raise UsageError(f"fold {k} has no usable training or validation scan "
                                 f"({len(train)} train, {len(val)} validation); check the splits "
                                 "and the input shape (scans that are mostly background are "
                                 "excluded)")
            init = init_states[k % len(init_states)] if init_states else None
            for member in members:
                cache = caches[member.family.cache_tag()]
                folder = member_fold_dir(work, member.name, k)
                if member.name:
                    LOGGER.info("fold %d: member %s", k, member.name)
                trainer, restarts = _train_member(trainer_cls, config, member, cache, train, val, k,
                                                  folder, dist, resume=resume, init=init)
                if dist.is_main:
                    result = _reused_evaluation(folder) if resume else None
                    if result is None:
                        result = member.family.evaluate_fold(cache, test, trainer.best_path,
                                                             dist.device,
                                                             config.export.robustness_spacings_mm)
                        if restarts:
                            result["stalled_restarts"] = restarts
                        (folder / "evaluation.json").write_text(json.dumps(result, indent=1),
                                                                encoding="utf-8")
                    if not family.ensemble:
                        results[k] = result
                    else:
                        results.setdefault(k, {})[member.name] = result
                dist.barrier()
        card = None
        if dist.is_main and export:
            done = {}
            for k in range(n_folds):
                found = {}
                for member in members:
                    folder = member_fold_dir(work, member.name, k)
                    path = folder / "evaluation.json"
                    if path.is_file() and (folder / "checkpoint_final.pt").is_file():
                        found[member.name] = json.loads(path.read_text(encoding="utf-8"))
                if len(found) == len(members):
                    done[k] = found if family.ensemble else found[members[0].name]
            if len(done) < n_folds:
                LOGGER.info("export postponed: %d of %d folds finished", len(done), n_folds)
            elif family.ensemble:
                # the baseline sees the input of the first sub-ensemble (T1w, whole brain)
                ridge = (ridge_cross_validation(caches[members[0].family.cache_tag()], usable, splits)
                         if config.export.ridge_baseline else None)
                card = family.export_ensemble(
                    config, usable, splits, done, work, dist.device,
                    caches={m.name: caches[m.family.cache_tag()] for m in members},
                    ridge=ridge, wall_seconds=time.perf_counter() - t0)
            else:
                cache = caches[members[0].family.cache_tag()]
                ridge = (ridge_cross_validation(cache, usable, splits)
                         if config.export.ridge_baseline else None)
                card = export_model(config, family, usable, splits, done, work, dist.device,
                                    ridge=ridge, fine_tuned_from=origin,
                                    wall_seconds=time.perf_counter() - t0)
        dist.barrier()
        return {"folds": results, "card": card}
    finally:
        teardown_distributed()
