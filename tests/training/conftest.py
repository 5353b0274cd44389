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

AGES = tuple(np.round(np.linspace(20, 85, 18), 2))


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """18 synthetic participants aged 20-85 with preproc T1w and brain masks (2 mm, RAS)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), AGES, shape=(28, 32, 28))


def tiny_config_text(bids: Path, derivs: Path, work: Path, models: Path, *, norm: str = "batch",
                     max_epochs: int = 3, batch_size: int = 4, folds: int = 3,
                     extra: str = "") -> str:
    """TOML of a tiny densenet-clinical run (seconds on a CPU)."""
    return f"""
family = "densenet-clinical"
seed = 7
work_dir = "{work}"
{extra}
[data]
bids_dir = "{bids}"
derivatives = ["{derivs}"]
folds = {folds}
val_fraction = 0.15

[model]
init_features = 4
growth_rate = 4
block_config = [2, 2]
norm = "{norm}"

[input]
spacing_mm = 4.0
shape = [14, 16, 10]
shift_mm = [4.0, 4.0, 4.0]

[optim]
lr = 0.003
batch_size = {batch_size}
max_epochs = {max_epochs}
plateau_patience = 2

[runtime]
device = "cpu"
progress = false
num_threads = 1

[export]
model_id = "densenet-clinical"
variant = "tiny-test"
models_dir = "{models}"
robustness_spacings_mm = [6.0]
"""


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
