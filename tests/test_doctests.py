"""The examples in the package's docstrings are tests too (``python -m pytest tests`` runs them)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import bidsapp


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(bidsapp.__path__, prefix="bidsapp."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as handle:
            if ">>> " in handle.read():
                names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see above)"
