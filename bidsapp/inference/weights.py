"""Checked loading of shipped weights: sha256 first, then ``torch.load(weights_only=True)``.

A model card (``<models_dir>/<id>/model_card.json``, see :mod:`bidsapp.inference.registry`)
lists each weights file with its sha256, by a path relative to the card's folder (the weights
lie next to the card).  Nothing is unpickled before the hash matches, and only tensors and
plain containers can be loaded at all, so a tampered or truncated file is refused with a
:class:`~bidsapp.errors.ModelError` (exit 65) naming it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelError

__all__ = ["sha256_file", "verify_sha256", "load_checked", "card_weight_files", "load_card_state_dicts",
           "network_with_state"]

LOGGER = logging.getLogger("brainage.inference")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, sha256: str) -> None:
    """Check that a weights file exists and has the sha256 its model card gives.

    Raises
    ------
    ModelError
        Invalid digest in the card, missing file, or digest mismatch.
    """
    path = Path(path)
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise ModelError(f"the model card gives no valid sha256 for {path}")
    if not path.is_file():
        raise ModelError(f"model weights {path} are missing; reinstall brainage or fix "
                         "BRAINAGE_MODELS_DIR")
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise ModelError(f"model weights {path} fail the sha256 check (expected {sha256[:12]}…, "
                         f"got {actual[:12]}…): the file is corrupted or was modified; reinstall "
                         "brainage")


def load_checked(path: str | Path, sha256: str, *, map_location: str = "cpu") -> dict[str, Any]:
    """Load a state dict after verifying its sha256.

    Parameters
    ----------
    path : path
        Weights file written with ``torch.save(state_dict)``.
    sha256 : str
        Expected hex digest (from the model card).
    map_location : str
        Device for the tensors.

    Returns
    -------
    dict
        The state dict, tensors converted to float32 where stored as float16.

    Raises
    ------
    ModelError
        Missing file, digest mismatch, or a file ``torch.load(weights_only=True)`` refuses.
    """
    import torch

    path = Path(path)
    verify_sha256(path, sha256)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or broken files
        raise ModelError(f"model weights {path} cannot be loaded safely: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ModelError(f"model weights {path} do not hold a state dict")
    return {k: (v.float() if getattr(v, "dtype", None) == torch.float16 else v)
            for k, v in state.items()}


def card_weight_files(card: Mapping[str, Any], folder: str | Path) -> list[tuple[Path, str]]:
    """``(path, sha256)`` of every weights file a model card lists, relative to ``folder``.

    ``folder`` is the card's own folder, as :func:`bidsapp.inference.registry.read_card` returns
    it (``<models_dir>/<id>``; ``<models_dir>`` for a card in the deprecated layout).
    """
    entries = card.get("weights")
    if not isinstance(entries, list) or not entries:
        raise ModelError(f"model card {card.get('id', '?')} lists no weights")
    out = []
    for entry in entries:
        if not isinstance(entry, Mapping) or "file" not in entry or "sha256" not in entry:
            raise ModelError(f"model card {card.get('id', '?')}: each weights entry needs "
                             "'file' and 'sha256'")
        out.append((Path(folder) / entry["file"], str(entry["sha256"])))
    return out


def load_card_state_dicts(card: Mapping[str, Any], folder: str | Path,
                          map_location: str = "cpu") -> list[dict[str, Any]]:
    """Checked state dicts of all weights files of a card (e.g. the folds of an ensemble)."""
    return [load_checked(path, digest, map_location=map_location)
            for path, digest in card_weight_files(card, folder)]


def network_with_state(net, state: Mapping[str, Any], device, what: str):
    """``net`` with ``state`` loaded, on ``device``, in eval mode.

    Parameters
    ----------
    net : torch.nn.Module
        Freshly built network of the card's architecture.
    state : mapping
        Checked state dict (:func:`load_checked`).
    device : torch.device
    what : str
        Names the weights in the error (e.g. ``"weights of densenet-clinical"``).

    Raises
    ------
    ModelError
        When the state does not fit the architecture (a card and weights out of step).
    """
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{what} do not match its architecture: {exc}") from exc
    return net.to(device).eval()

