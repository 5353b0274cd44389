"""Shipped models: each is one folder ``<id>/`` holding its card ``model_card.json`` and weights.

A models folder is a folder of model folders::

    <models_dir>/<id>/model_card.json   the card: architecture, input, weights with sha256, metrics
    <models_dir>/<id>/*.pt              the weights, named in the card relative to the card's folder
    <models_dir>/<id>/splits.json       the cross-validation split (and cv_predictions.tsv)

Models folders are looked up in ``$BRAINAGE_MODELS_DIR`` when set (a site's own or fine-tuned
models), else in the models installed with the package.  The layout of earlier versions (a card
``<models_dir>/<id>.json`` beside the folder ``<id>/``, weight paths relative to
``<models_dir>``) is still read, with a deprecation warning.
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

__all__ = ["CARD_NAME", "models_dir", "card_path", "weight_card", "weight_card_path",
           "available_models", "read_card", "require_family", "resolve_models", "verify_models",
           "training_age_range"]

LOGGER = logging.getLogger("brainage.inference")

#: File name of the model card inside each model folder.
CARD_NAME = "model_card.json"
_warned_legacy: set[Path] = set()


def _warn_legacy(card: Path) -> None:
    """Log once per models folder that it still has the layout of earlier versions."""
    folder = card.parent.resolve()
    if folder in _warned_legacy:
        return
    _warned_legacy.add(folder)
    LOGGER.warning("%s has model cards in the layout of earlier brainage versions (<id>.json "
                   "beside <id>/); this layout is deprecated: move each card to "
                   "<id>/%s and make its weight paths relative to that folder",
                   card.parent, CARD_NAME)


def models_dir() -> Path:
    """The models folder: one folder ``<id>/`` per model, with its card and weights.

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


def card_path(model_id: str, folder: str | Path | None = None) -> Path | None:
    """The card of ``model_id`` in the models folder ``folder`` (default: :func:`models_dir`).

    ``<folder>/<model_id>/model_card.json``, else the deprecated ``<folder>/<model_id>.json``
    (logged once per folder), else ``None``.
    """
    folder = Path(folder) if folder is not None else models_dir()
    card = folder / model_id / CARD_NAME
    if card.is_file():
        return card
    legacy = folder / f"{model_id}.json"
    if legacy.is_file():
        _warn_legacy(legacy)
        return legacy
    return None


def weight_card_path(folder: str | Path, weights_file: str) -> Path:
    """The card of one weight file: ``<stem>.json`` beside ``<stem>.pt`` in the model folder."""
    return Path(folder) / Path(weights_file).with_suffix(".json")


def weight_card(card: dict, entry: dict) -> dict:
    """The model card of one checkpoint, derived from its model's card.

    Written by the training export beside every weight file, so that each checkpoint carries
    its architecture, configuration, training data, seed, CV metrics and sha256 wherever it is
    copied.  The app reads only ``model_card.json``; the tests check that every weight card
    equals what this function derives from it.

    Parameters
    ----------
    card : dict
        The model card (``model_card.json``).
    entry : dict
        The card's ``weights`` entry of the checkpoint.

    Returns
    -------
    dict
    """
    training = card.get("training") or {}
    cross_validation = (card.get("metrics") or {}).get("cross_validation") or {}
    fold = [m for m in cross_validation.get("per_fold") or [] if m.get("fold") == entry.get("fold")]
    return {"model_card": CARD_NAME, "id": card.get("id"), "family": card.get("family"),
            "variant": card.get("variant"), "seed_paper": card.get("seed_paper"),
            "weights": entry, "architecture": card.get("architecture"),
            "input": card.get("input"), "training_data": card.get("training_data"),
            "split": card.get("split"), "seed": (training.get("config") or {}).get("seed"),
            "config": training.get("config"),
            "metrics": {"fold": fold[0] if fold else None,
                        "pooled": cross_validation.get("pooled")}}


def read_card(model_id: str, folder: str | Path | None = None) -> tuple[dict, Path]:
    """The parsed card of ``model_id`` and the folder its weight paths are relative to.

    Parameters
    ----------
    model_id : str
    folder : path, optional
        A models folder (a folder of model folders); default: :func:`models_dir`.

    Returns
    -------
    tuple
        The card and the card's own folder (``<folder>/<model_id>``; ``<folder>`` for a card in
        the deprecated ``<folder>/<model_id>.json`` layout).

    Raises
    ------
    ModelError
        When the card is missing or not valid JSON.
    """
    folder = Path(folder) if folder is not None else models_dir()
    path = card_path(model_id, folder)
    if path is None:
        raise ModelError(f"no {model_id} model card in {folder} (expected "
                         f"{folder / model_id / CARD_NAME})")
    card = read_json_file(path, "model card", missing=ModelError, invalid=ModelError)
    return card, path.parent


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
    """Model cards of the shipped models, keyed by model id.

    A card counts when its ``id`` is a known model id and is the name of its model folder (or,
    in the deprecated layout, of the card file).
    """
    folder = models_dir()
    if not folder.is_dir():
        return {}
    found = [(p.parent.name, p) for p in sorted(folder.glob(f"*/{CARD_NAME}"))]
    legacy = [(p.stem, p) for p in sorted(folder.glob("*.json"))
              if not (folder / p.stem / CARD_NAME).is_file()]
    cards = {}
    for name, card in found + legacy:
        try:
            content = json.loads(card.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"model card {card} is not valid JSON ({exc}); reinstall brainage") from exc
        if not isinstance(content, dict) or content.get("id") not in MODEL_IDS:
            continue
        if content["id"] != name:
            LOGGER.warning("model card %s is for %s, not %s: ignored", card, content["id"], name)
            continue
        if card.name != CARD_NAME:
            _warn_legacy(card)
        cards.setdefault(content["id"], content)
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
