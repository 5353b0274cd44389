"""Fixtures of the training-engine tests: a tiny synthetic dataset and tiny configs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `training/` is importable from the checkout root
    sys.path.insert(0, str(REPO))

from training.synthetic import make_synthetic_dataset  # noqa: E402
from training_configs import tiny_config_text  # noqa: E402

AGES = tuple(np.round(np.linspace(20, 85, 18), 2))


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """18 synthetic participants aged 20-85 with preproc T1w and brain masks (2 mm, RAS)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), AGES, shape=(28, 32, 28))


@pytest.fixture
def tiny_config(synth_dataset, tmp_path):
    """Write a tiny config; returns a function taking keyword overrides of :func:`tiny_config_text`."""
    bids, derivs = synth_dataset

    def write(name: str = "tiny", **kwargs) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(tiny_config_text(bids, derivs, tmp_path / f"work-{name}",
                                         tmp_path / f"models-{name}", **kwargs))
        return path
    return write
