"""Fold evaluation and export of weights plus model card to the models folder."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bidsapp.inference.registry import CARD_NAME, weight_card, weight_card_path
from bidsapp.inference.weights import sha256_file

from .baselines import RidgeBaseline
from .config import TrainConfig
from .data import InputCache, ScanRecord
from .evaluate import predict_views, regression_metrics
from .families import ModelFamily

__all__ = ["to_fp16", "evaluate_fold", "ridge_cross_validation", "export_model",
           "environment_info", "card_header", "training_record", "write_card"]

LOGGER = logging.getLogger("brainage.training")
# Output scaling stays float32: fp16 would round a 45-year offset by ~0.02 y on its own.
_KEEP_FP32 = ("target_offset", "target_scale")


def to_fp16(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors to float16, except the output scaling buffers."""
    return {k: (v.half() if v.is_floating_point() and not k.endswith(_KEEP_FP32) else v)
            for k, v in state.items()}


def _roundtrip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.dtype == torch.float16 else v) for k, v in to_fp16(state).items()}


def evaluate_fold(family: ModelFamily, cache: InputCache, test: Sequence[ScanRecord],
                  best_path: Path, device: torch.device,
                  robustness_spacings: Sequence[float] = ()) -> dict[str, Any]:
    """Predict the held-out scans of one fold with its best weights.

    Returns per-scan rows (prediction as mean over views, per thick-slice spacing), the fold
    metrics, and the largest prediction change caused by storing the weights as float16.
    """
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    net = family.build_network()
    net.load_state_dict(state["model"])
    net.to(device)
    views = [cache.views(r.key) for r in test]
    full = [float(np.mean(p)) for p in predict_views(net, views, device)]
    net.load_state_dict(_roundtrip(state["model"]))
    half = [float(np.mean(p)) for p in predict_views(net, views, device)]
    net.load_state_dict(state["model"])
    rows = [{"key": r.key, "participant": r.participant, "age": r.age, "sex": r.sex,
             "predicted": p} for r, p in zip(test, full)]
    for spacing in robustness_spacings:
        thick = [family.prepare_robustness(r, spacing) for r in test]
        for row, p in zip(rows, predict_views(net, thick, device)):
            row[f"predicted_{spacing:g}mm"] = float(np.mean(p))
    return {"best_epoch": int(state["epoch"]), "best_val_mae": float(state["val_mae"]),
            "rows": rows,
            "metrics": regression_metrics([r.age for r in test], full) if len(test) > 1 else {},
            "fp16_max_change_years": float(np.max(np.abs(np.subtract(full, half)))) if test else 0.0}


def ridge_cross_validation(cache: InputCache, records: Sequence[ScanRecord],
                           splits: Mapping[str, Any]) -> dict[str, Any]:
    """Ridge regression on the mean of each scan's views, same folds (train+val fit, test)."""
    by_participant: dict[str, list[ScanRecord]] = {}
    for record in records:
        by_participant.setdefault(record.participant, []).append(record)

    def design(part: Sequence[str]) -> tuple[list[ScanRecord], np.ndarray]:
        chosen = [r for p in part for r in by_participant.get(p, [])]
        X = np.stack([np.mean(np.stack(cache.views(r.key)).astype(np.float32), axis=0).ravel()
                      for r in chosen]) if chosen else np.zeros((0, 0))
        return chosen, X

    predictions, ages, per_fold = {}, {}, []
    for fold in splits["folds"]:
        train, X = design(fold["train"] + fold["val"])
        test, Xt = design(fold["test"])
        if not test:
            continue
        model = RidgeBaseline().fit(X, [r.age for r in train])
        pred = model.predict(Xt)
        for r, p in zip(test, pred):
            predictions[r.key], ages[r.key] = float(p), r.age
        per_fold.append({"fold": fold["fold"], "alpha": model.alpha_,
                         **(regression_metrics([r.age for r in test], pred) if len(test) > 1 else {})})
    keys = sorted(predictions)
    pooled = regression_metrics([ages[k] for k in keys], [predictions[k] for k in keys])
    return {"pooled": pooled, "per_fold": per_fold, "predictions": predictions,
            "features": "the network's input views (mean over views), flattened"}


def environment_info(device: torch.device) -> dict[str, Any]:
    """Hardware and package versions for the model card."""
    import importlib.metadata as md

    import bidsapp

    versions = {"python": platform.python_version(), "brainage": bidsapp.__version__}
    for pkg in ("torch", "monai", "numpy", "scipy", "nibabel"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    hardware = {"device": str(device), "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
    return {"hardware": hardware, "versions": versions, "platform": platform.platform()}


def _data_summary(config: TrainConfig, records: Sequence[ScanRecord]) -> dict[str, Any]:
    name = config.data.bids_dir.name
    desc = config.data.bids_dir / "dataset_description.json"
    if desc.is_file():
        name = json.loads(desc.read_text(encoding="utf-8")).get("Name", name)
    ages = np.array([r.age for r in records])
    sexes: dict[str, int] = {}
    for r in records:
        sexes[str(r.sex)] = sexes.get(str(r.sex), 0) + 1
    return {"dataset": name, "bids_dir_name": config.data.bids_dir.name,
            "n_scans": len(records), "n_participants": len({r.participant for r in records}),
            "age_min": float(ages.min()), "age_max": float(ages.max()),
            "age_mean": float(ages.mean()), "age_sd": float(ages.std(ddof=1)) if len(ages) > 1 else 0.0,
            "sex": sexes, "sites": sorted({str(r.site) for r in records}),
            "preprocessing": "brainage participant level (desc-preproc_T1w, desc-brain_mask)"}


def _robustness(rows: Sequence[Mapping[str, Any]], spacings: Sequence[float]) -> dict[str, Any]:
    out = {}
    for s in spacings:
        col = f"predicted_{s:g}mm"
        usable = [r for r in rows if col in r]
        if len(usable) < 2:
            continue
        diff = np.array([r[col] - r["predicted"] for r in usable])
        out[f"{s:g}mm"] = {
            "mae_vs_full_resolution": float(np.mean(np.abs(diff))),
            "mean_shift_vs_full_resolution": float(diff.mean()),
            "metrics_vs_age": regression_metrics([r["age"] for r in usable], [r[col] for r in usable])}
    return out



def card_header(config: TrainConfig, family: ModelFamily, weights: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields every model card starts with: identity, seed paper, architecture, input, weights."""
    return {"id": config.export.model_id, "family": family.name, "variant": config.export.variant,
            "seed_paper": family.seed_paper,
            "architecture": family.architecture(), "input": family.preprocessing(),
            "weights": weights}


def training_record(config: TrainConfig, device: torch.device, train_seconds: float,
                    wall_seconds: float | None) -> dict[str, Any]:
    """The card's ``training`` block: portable config, time, hardware, versions, date."""
    return {"config": _portable(config.to_dict()), "train_seconds_total": float(train_seconds),
            "wall_seconds": wall_seconds, **environment_info(device),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_card(card: Mapping[str, Any], models_dir: Path) -> Path:
    """Write ``<models_dir>/<id>/model_card.json`` atomically (a reader never sees half a card),
    and beside each weight file ``<stem>.pt`` its own card ``<stem>.json``.

    The card's file paths are relative to that folder, where the weights are written.
    """
    card_path = models_dir / card["id"] / CARD_NAME
    card_path.parent.mkdir(parents=True, exist_ok=True)
    for entry in card["weights"]:  # each checkpoint's own card, derived from the model card
        _write_json_atomic(weight_card_path(card_path.parent, entry["file"]),
                           weight_card(card, entry))
    _write_json_atomic(card_path, card)
    return card_path


def _write_json_atomic(path: Path, content: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(content, indent=1, default=float), encoding="utf-8")
    tmp.replace(path)


def export_model(config: TrainConfig, family: ModelFamily, records: Sequence[ScanRecord],
                 splits: Mapping[str, Any], fold_results: Mapping[int, Mapping[str, Any]],
                 work_dir: Path, device: torch.device, *, ridge: Mapping[str, Any] | None = None,
                 fine_tuned_from: Mapping[str, Any] | None = None,
                 wall_seconds: float | None = None) -> Path:
    """Write ``<models_dir>/<id>/fold{k}.pt`` and the card ``<models_dir>/<id>/model_card.json``.

    Returns
    -------
    Path
        The model card.
    """
    exp = config.export
    model_id = exp.model_id
    folder = exp.models_dir / model_id
    folder.mkdir(parents=True, exist_ok=True)
    spacings = exp.robustness_spacings_mm
    weights, per_fold, all_rows = [], [], []
    for k in sorted(fold_results):
        result = fold_results[k]
        state = torch.load(work_dir / f"fold{k}" / "checkpoint_best.pt", map_location="cpu",
                           weights_only=True)["model"]
        half = exp.fp16 == "always" or (
            exp.fp16 == "auto" and result["fp16_max_change_years"] < exp.fp16_tolerance_years)
        target = folder / f"fold{k}.pt"
        tmp = target.with_suffix(".part")
        torch.save(to_fp16(state) if half else state, tmp)
        tmp.replace(target)
        size = target.stat().st_size
        if size > 50 * 2 ** 20:
            LOGGER.warning("%s is %.1f MB (> 50 MB)", target, size / 2 ** 20)
        weights.append({"fold": k, "file": target.name, "sha256": sha256_file(target),
                        "dtype": "float16" if half else "float32", "bytes": size,
                        "fp16_max_change_years": result["fp16_max_change_years"]})
        seconds = _fold_seconds(work_dir / f"fold{k}")
        per_fold.append({"fold": k, "best_epoch": result["best_epoch"],
                         "best_val_mae": result["best_val_mae"], "train_seconds": seconds,
                         **result["metrics"]})
        all_rows.extend(dict(r, fold=k) for r in result["rows"])
    pooled = regression_metrics([r["age"] for r in all_rows], [r["predicted"] for r in all_rows])
    _write_predictions(folder / "cv_predictions.tsv", all_rows, ridge)
    (folder / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    card = {
        **card_header(config, family, weights),
        "prediction": {
            "ensemble": "mean of the fold models' predictions (each the mean over the input views)",
            "interval": "95% interval of the fold models: mean +/- t(0.975, K-1) * SD * sqrt(1 + 1/K); "
                        "it reflects disagreement between the fold models only, not the error "
                        "against chronological age (see metrics)",
            "interval_level": 0.95},
        "training_data": _data_summary(config, records),
        "split": {"unit": "participant", "folds": len(splits["folds"]),
                  "scheme": f"age-stratified {len(splits['folds'])}-fold; per fold "
                            f"{config.data.val_fraction:.0%} of participants for validation "
                            "(early stopping, LR schedule, best epoch), test part = held-out fold",
                  "file": "splits.json", "seed": config.seed},
        "metrics": {"cross_validation": {"pooled": pooled, "per_fold": per_fold,
                                         "predictions": "cv_predictions.tsv"},
                    "ridge_baseline": ({"pooled": ridge["pooled"], "per_fold": ridge["per_fold"],
                                        "features": ridge["features"]} if ridge else None),
                    "thick_slice_robustness": _robustness(all_rows, spacings)},
        "training": training_record(config, device, sum(f["train_seconds"] for f in per_fold),
                                    wall_seconds),
        "fine_tuned_from": dict(fine_tuned_from) if fine_tuned_from else None,
        "notes": exp.notes,
    }
    for key, value in family.card_extras(fold_results).items():
        both_tables = isinstance(value, Mapping) and isinstance(card.get(key), Mapping)
        card[key] = {**card[key], **value} if both_tables else value
    card_path = write_card(card, exp.models_dir)
    LOGGER.info("wrote %s (pooled CV MAE %.2f y, r %.3f)", card_path, pooled["mae"], pooled["r"])
    return card_path


def _fold_seconds(folder: Path) -> float:
    import csv

    path = folder / "metrics.csv"
    if not path.is_file():
        return 0.0
    with open(path, encoding="utf-8") as handle:
        return float(sum(float(row["seconds"]) for row in csv.DictReader(handle)))


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """The config with absolute paths reduced to their last component (no local paths in cards)."""
    def strip(value: Any) -> Any:
        if isinstance(value, str) and os.path.isabs(value):
            return Path(value).name
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value
    return strip(config)


def _write_predictions(path: Path, rows: Sequence[Mapping[str, Any]],
                       ridge: Mapping[str, Any] | None) -> None:
    extra = sorted({k for r in rows for k in r if k.startswith("predicted_")})
    header = ["key", "participant", "fold", "age", "sex", "predicted", *extra]
    if ridge:
        header.append("ridge")
    lines = ["\t".join(header)]
    for r in sorted(rows, key=lambda r: r["key"]):
        values = [r["key"], r["participant"], r["fold"], f"{r['age']:.2f}", r["sex"] or "n/a",
                  f"{r['predicted']:.3f}", *(f"{r[c]:.3f}" if c in r else "n/a" for c in extra)]
        if ridge:
            p = ridge["predictions"].get(r["key"])
            values.append("n/a" if p is None else f"{p:.3f}")
        lines.append("\t".join(str(v) for v in values))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
