"""Shipped models: each is a model card JSON (``<id>.json``) beside its weights.

Cards are looked up in ``$BRAINAGE_MODELS_DIR`` when set (a site's own or fine-tuned models),
else in the models installed with the package.
"""

from __future__ import annotations

import json
import logging
import os
import importlib.util
from pathlib import Path
from typing import Sequence

from ..config import MODEL_IDS
from ..errors import ModelError
from ..jsonfiles import read_json_file

__all__ = ["models_dir", "available_models", "read_card", "require_family", "resolve_models",
           "verify_models", "training_age_range"]

LOGGER = logging.getLogger("brainage.inference")


def models_dir() -> Path:
    """Folder holding model cards and weights.

    ``$BRAINAGE_MODELS_DIR`` overrides; an installed package has them as ``bidsapp._models``
    (the checkout's top-level ``models/``, mapped by setup.cfg); a checkout uses ``models/``.
    """
    override = os.environ.get("BRAINAGE_MODELS_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("bidsapp._models")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "models"


def read_card(model_id: str, folder: str | Path | None = None) -> tuple[dict, Path]:
    """The parsed card ``<folder>/<model_id>.json`` and its folder (default: :func:`models_dir`).

    Raises
    ------
    ModelError
        When the card is missing or not valid JSON.
    """
    folder = Path(folder) if folder is not None else models_dir()
    card_path = folder / f"{model_id}.json"
    if not card_path.is_file():
        raise ModelError(f"no {model_id} model card in {folder}")
    card = read_json_file(card_path, "model card", missing=ModelError, invalid=ModelError)
    return card, folder


def require_family(card: dict, family: str, article: str = "a") -> None:
    """Refuse a card of another model family (a predictor must not load foreign weights).

    ``article`` makes the message read well ("an mlens model").

    Raises
    ------
    ModelError
    """
    if card.get("family") != family:
        raise ModelError(f"model card {card.get('id')} is not {article} {family} model "
                         f"(family {card.get('family')!r})")


def available_models() -> dict[str, dict]:
    """Model cards of the shipped models, keyed by model id."""
    folder = models_dir()
    cards = {}
    for card in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            content = json.loads(card.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"model card {card} is not valid JSON ({exc}); reinstall brainage") from exc
        if content.get("id") in MODEL_IDS:
            cards[content["id"]] = content
    return cards


def resolve_models(requested: Sequence[str]) -> list[str]:
    """Turn ``('all',)``, ``()`` (none) or explicit ids into the list of models to run.

    Raises
    ------
    ModelError
        When an explicitly requested model has no shipped weights.
    """
    shipped = available_models()
    if tuple(requested) == ("all",):
        if not shipped:
            LOGGER.warning("no brain-age model is shipped in this version: running preprocessing only")
        return [m for m in MODEL_IDS if m in shipped]
    missing = [m for m in requested if m not in shipped and m != "ensemble"]
    if missing:
        raise ModelError(f"model(s) {', '.join(missing)} have no weights in {models_dir()} "
                         f"(shipped: {', '.join(shipped) or 'none'}); use --models all or none")
    return list(requested)


def verify_models(model_ids: Sequence[str]) -> dict[str, dict]:
    """Check every weights file of ``model_ids`` against its card's sha256, before any work.

    The predictors check again when they load; checking here too makes a tampered or missing
    file stop the run at once (exit 65) instead of failing every participant after preprocessing.

    Returns
    -------
    dict
        The card of each model (``ensemble`` has none).

    Raises
    ------
    ModelError
    """
    from .weights import card_weight_files, verify_sha256

    cards = {}
    for model in model_ids:
        if model == "ensemble":
            continue
        card, folder = read_card(model)
        for path, digest in card_weight_files(card, folder):
            verify_sha256(path, digest)
        cards[model] = card
    return cards


def training_age_range(card: dict) -> tuple[float, float] | None:
    """``(age_min, age_max)`` in years of the data a model was trained on, when its card says."""
    data = card.get("training_data")
    if not isinstance(data, dict):
        return None
    try:
        low, high = float(data["age_min"]), float(data["age_max"])
    except (KeyError, TypeError, ValueError):
        return None
    return (low, high) if low <= high else None
