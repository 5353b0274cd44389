"""Tiny diffusion-ae models for the tests: trained and exported by the real training engine.

Importable by name (never import from 'conftest', a name several conftest.py files share).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# `training/` is importable from the checkout root; the engine tests' config builder from theirs
for _path in (REPO, REPO / "tests" / "training"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

__all__ = ["AGES", "TINY_NET", "TINY_INPUT", "MC_SAMPLES", "DDIM_STEPS", "export_tiny_diffusion_ae",
           "mni_t1w"]

#: Ages of the ten synthetic participants the tiny model is trained on.
AGES = tuple(np.round(np.linspace(20, 85, 10), 2))
#: A diffusion autoencoder of a few thousand parameters (32^2 slices, three U-Net levels).
TINY_NET = {"channels": [8, 8, 16], "num_res_blocks": 1, "attention_blocks": 1,
            "attention_head_channels": 8, "norm_num_groups": 8, "embed_dim": 32,
            "latent_dim": 16, "age_hidden": [8, 4], "num_train_timesteps": 100}
#: The medial slice of a 40^3 cube, resized to 32^2, and one neighbour on each side (3 planes
#: apart): training augmentation, and test-time augmentation where the card says views "all".
TINY_INPUT = {"grid_size": 40, "size": 32, "neighbour_slices": 1, "neighbour_step": 3}
#: Monte-Carlo dropout passes per fold and DDIM steps the card records.
MC_SAMPLES, DDIM_STEPS = 20, 5


def export_tiny_diffusion_ae(root: Path) -> tuple[Path, Path]:
    """Train 2 folds x 2 epochs of a tiny diffusion autoencoder on 32^2 slices and export it.

    Returns
    -------
    (models_dir, derivs)
        The models folder holding the exported diffusion-ae model (card with
        ``prediction.mc_dropout_samples`` = :data:`MC_SAMPLES`, ``prediction.ddim_steps`` =
        :data:`DDIM_STEPS` and three views per scan) and the synthetic derivatives (MNI-space T1w of participants
        ``s000`` ... ``s009``).
    """
    import torch

    from training.config import load_config
    from training.run import run_training
    from training.synthetic import make_synthetic_dataset
    from training_configs import engine_config_text

    torch.set_num_threads(1)
    bids, derivs = make_synthetic_dataset(root / "data", AGES, shape=(12, 12, 12), mni=True)
    cfg = root / "diffusion-ae.toml"
    cfg.write_text(engine_config_text(
        "diffusion-ae", bids, derivs, root / "work", root / "models", seed=3, folds=2,
        val_fraction=0.2, model={**TINY_NET, "mc_samples": MC_SAMPLES, "ddim_steps": DDIM_STEPS},
        inputs=TINY_INPUT,
        optim={"lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "batch_size": 3,
               "max_epochs": 2, "plateau_patience": 100},
        export={"fp16": "never", "robustness_spacings_mm": [], "ridge_baseline": False}))
    run_training(load_config(cfg))
    return root / "models", derivs


def mni_t1w(derivs: Path, participant: str = "s003") -> Path:
    """The MNI-space T1w of one synthetic participant."""
    anat = derivs / f"sub-{participant}" / "anat"
    return next(anat.glob("*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"))
