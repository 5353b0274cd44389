"""Tiny vgg-cbv models for the tests: trained and exported by the real training engine.

Importable by name (never import from 'conftest', a name several conftest.py files share).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# `training/` is importable from the checkout root; the engine tests' config builder from theirs
for _path in (REPO, REPO / "tests" / "training"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

__all__ = ["AGES", "export_tiny_vgg_cbv", "add_cbv_branch", "write_cbv_checkpoint", "mni_t1w"]

#: Ages of the ten synthetic participants the tiny model is trained on.
AGES = tuple(np.round(np.linspace(20, 85, 10), 2))


def export_tiny_vgg_cbv(root: Path) -> tuple[Path, Path]:
    """Train 2 folds x 2 epochs of a tiny VGG8 (8 mm, 32^3 voxels) and export it.

    Returns
    -------
    (models_dir, derivs)
        The models folder holding the exported vgg-cbv model (T1w branch, stacks T and TS) and
        the synthetic derivatives (MNI-space T1w of participants ``s000`` ... ``s009``).
    """
    import torch

    from training.config import load_config
    from training.run import run_training
    from training.synthetic import make_synthetic_dataset
    from training_configs import tiny_vgg_cbv_config_text

    torch.set_num_threads(1)
    bids, derivs = make_synthetic_dataset(root / "data", AGES, shape=(16, 16, 16), mni=True)
    cfg = root / "vgg.toml"
    cfg.write_text(tiny_vgg_cbv_config_text(bids, derivs, root / "work", root / "models",
                                           ridge_baseline=False))
    run_training(load_config(cfg))
    return root / "models", derivs


def mni_t1w(derivs: Path, participant: str = "s003") -> Path:
    """The MNI-space T1w of one synthetic participant."""
    anat = derivs / f"sub-{participant}" / "anat"
    return next(anat.glob("*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"))


def add_cbv_branch(models_dir: Path, target: Path, *, coef=None) -> dict:
    """Copy ``models_dir`` to ``target`` and give its vgg-cbv card a CBV branch and TA/TAS stacks.

    The CBV-branch weights of fold ``k`` are the T1w branch's fold ``k`` stored under another
    name (its own sha256 in the card); ``coef`` sets the stacks ``{"TA": [...], "TAS": [...]}``
    (intercept first, then t1w, cbv[, sex]).  The card is rewritten where the registry reads it.

    Returns
    -------
    dict
        The new card.
    """
    from bidsapp.inference.registry import card_path, read_card
    from bidsapp.inference.weights import sha256_file

    shutil.copytree(models_dir, target)
    card, folder = read_card("vgg-cbv", target)
    extra = []
    for entry in card["weights"]:
        source = folder / entry["file"]
        copy = source.with_name(f"cbv_{source.name}")
        shutil.copyfile(source, copy)
        extra.append({**entry, "branch": "cbv", "file": copy.relative_to(folder).as_posix(),
                      "sha256": sha256_file(copy)})
    card["weights"] = card["weights"] + extra
    coef = coef or {"TA": [2.0, 0.6, 0.3], "TAS": [1.5, 0.6, 0.3, -0.5]}
    for name, values in coef.items():
        columns = {"TA": ["t1w", "cbv"], "TAS": ["t1w", "cbv", "sex"]}[name]
        card["stacking"]["stacks"][name] = {"predictors": name, "columns": columns,
                                            "cv_mae": 1.0, "coef": list(values)}
    card_path("vgg-cbv", target).write_text(json.dumps(card), encoding="utf-8")
    return card


def write_cbv_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A tiny CBV synthesis checkpoint in the format ``training.cbv_synth`` writes (untrained)."""
    import torch

    from bidsapp.nets import CBVSynthNet
    from bidsapp.nets.cbv_synth import CBV_CHECKPOINT_FORMAT

    torch.manual_seed(seed)
    net = CBVSynthNet(channels=(2, 4), ssm_blocks=1, d_state=2, scan_paths=1)
    with torch.no_grad():  # CBV maps are positive, about 1 in the brain (units of its median)
        net.head.bias.fill_(1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CBV_CHECKPOINT_FORMAT, "model_args": net.init_args, "patch": 64,
                "epoch": 0, "model": net.state_dict()}, path)
    return path
