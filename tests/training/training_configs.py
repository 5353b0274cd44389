"""Tiny training configurations for the engine tests (importable by name; never import from
'conftest', a name several conftest.py files share)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["tiny_config_text"]


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
