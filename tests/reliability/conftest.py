"""Fixtures of the reliability catalogue (builders are in reliability_cases.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from reliability_cases import make_dataset


@pytest.fixture(autouse=True)
def _no_shipped_models(tmp_path, monkeypatch):
    """Point the registry at an empty folder, so whatever lies in models/ cannot change a case."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(empty))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A valid one-participant dataset (``sub-01``, age 30) in ``tmp_path/ds``."""
    return make_dataset(tmp_path / "ds")


@pytest.fixture(autouse=True)
def _drop_log_handlers_of_closed_streams():
    """The in-process CLI logs to the captured stderr of its test; once that stream is closed,
    later log records would print 'Logging error' noise."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            root.removeHandler(handler)
