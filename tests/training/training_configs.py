"""Tiny training configurations for the engine tests (importable by name; never import from
'conftest', a name several conftest.py files share)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["engine_config_text", "tiny_config_text", "tiny_vgg_cbv_config_text"]


def engine_config_text(family: str, bids: Path, derivs: Path, work: Path, models: Path, *,
                       seed: int, folds: int, val_fraction: float, model: Mapping[str, Any],
                       inputs: Mapping[str, Any], optim: Mapping[str, Any],
                       export: Mapping[str, Any] | None = None, extra: str = "") -> str:
    """TOML of a tiny CPU run of the training engine (one thread, no progress bar).

    Parameters
    ----------
    family : str
        Model family; also the exported model id.
    bids, derivs : path
        The dataset and its derivatives (e.g. from ``make_synthetic_dataset``).
    work, models : path
        Work folder and the folder the model is exported to (variant ``tiny-test``).
    seed, folds, val_fraction : int, int, float
        Top-level seed and the ``[data]`` split.
    model, inputs, optim : mapping
        The ``[model]``, ``[input]`` and ``[optim]`` tables.
    export : mapping, optional
        Further ``[export]`` keys.
    extra : str
        Raw top-level TOML lines (before the first table).

    Returns
    -------
    str
        The configuration, for ``training.config.load_config``.

    Examples
    --------
    >>> text = engine_config_text("mlens", Path("b"), Path("d"), Path("w"), Path("m"), seed=1,
    ...                           folds=2, val_fraction=0.2, model={}, inputs={"resolution_mm": 8.0},
    ...                           optim={"lr": 1e-3, "betas": [0.9, 0.999]})
    >>> print(text[text.index("[optim]"):text.index("[runtime]")].strip())
    [optim]
    lr = 0.001
    betas = [0.9, 0.999]
    """
    tables = {
        "data": {"bids_dir": str(bids), "derivatives": [str(derivs)], "folds": folds,
                 "val_fraction": val_fraction},
        "model": model, "input": inputs, "optim": optim,
        "runtime": {"device": "cpu", "progress": False, "num_threads": 1},
        "export": {"model_id": family, "variant": "tiny-test", "models_dir": str(models),
                   **(export or {})}}
    lines = [f"family = {json.dumps(family)}", f"seed = {seed}", f"work_dir = {json.dumps(str(work))}",
             extra]
    for name, table in tables.items():
        lines.append(f"[{name}]")
        # JSON writes strings, numbers, booleans and lists the way TOML reads them
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def tiny_config_text(bids: Path, derivs: Path, work: Path, models: Path, *, norm: str = "batch",
                     max_epochs: int = 3, batch_size: int = 4, folds: int = 3,
                     extra: str = "") -> str:
    """TOML of a tiny densenet-clinical run (seconds on a CPU)."""
    return engine_config_text(
        "densenet-clinical", bids, derivs, work, models, seed=7, folds=folds, val_fraction=0.15,
        model={"init_features": 4, "growth_rate": 4, "block_config": [2, 2], "norm": norm},
        inputs={"spacing_mm": 4.0, "shape": [14, 16, 10], "shift_mm": [4.0, 4.0, 4.0]},
        optim={"lr": 0.003, "batch_size": batch_size, "max_epochs": max_epochs,
               "plateau_patience": 2},
        export={"robustness_spacings_mm": [6.0]}, extra=extra)


def tiny_vgg_cbv_config_text(bids: Path, derivs: Path, work: Path, models: Path, *,
                             ridge_baseline: bool = True) -> str:
    """2 folds x 2 epochs of a tiny VGG8 (widths 4, dense 8-8) on 8 mm inputs (32^3 voxels)."""
    return engine_config_text(
        "vgg-cbv", bids, derivs, work, models, seed=2, folds=2, val_fraction=0.2,
        model={"channels": [4, 4, 4, 4, 4], "dense_units": [8, 8]},
        inputs={"resolution_mm": 8.0, "shape": [32, 32, 32]},
        optim={"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "batch_size": 3,
               "max_epochs": 2, "plateau_patience": 100},
        export={"fp16": "never", "robustness_spacings_mm": [], "ridge_baseline": ridge_baseline})
