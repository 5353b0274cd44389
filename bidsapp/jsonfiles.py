"""Reading user- and package-supplied JSON files with one clear error per failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BrainageError, InputMissingError, UsageError

__all__ = ["read_json_file"]


def read_json_file(path: str | Path, what: str, *,
                   missing: type[BrainageError] = InputMissingError,
                   invalid: type[BrainageError] = UsageError) -> Any:
    """Parse the JSON file ``path``.

    Parameters
    ----------
    path : path
        The file.
    what : str
        How messages name it, e.g. ``"--bids-filter-file"`` or ``"model card"``.
    missing, invalid : BrainageError subclasses
        Raised when the file does not exist, or is not valid JSON.

    Examples
    --------
    >>> read_json_file("/nonexistent.json", "analysis file")
    Traceback (most recent call last):
    ...
    bidsapp.errors.InputMissingError: analysis file /nonexistent.json does not exist
    """
    path = Path(path)
    if not path.is_file():
        raise missing(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise invalid(f"{what} {path} is not valid JSON: {exc}") from None
