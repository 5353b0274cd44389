"""The shipped training configs parse, and the full-size one runs (tiny input, one epoch)."""

from __future__ import annotations

from pathlib import Path

import torch

from training.config import load_config
from training.families import get_family
from training.run import run_training

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def test_reduced_cpu_config_is_valid():
    config = load_config(CONFIGS / "densenet-clinical-cpu.toml")
    family = get_family(config.family, config.model, config.input)
    assert config.export.variant == "reduced-cpu"
    assert family.spec.shape == (54, 80, 27) and family.spec.spacing_mm == 3.0
    assert sum(p.numel() for p in family.build_network().parameters()) < 1_000_000


def test_full_size_config_runs_on_a_tiny_input(synth_dataset, tmp_path):
    bids, derivs = synth_dataset
    config = load_config(CONFIGS / "densenet-clinical-full.toml", [
        f"data.bids_dir='{bids}'", f"data.derivatives=['{derivs}']", "data.folds=2",
        # 6 participants: each forward pass of the 169-layer network costs ~1 s on a CPU
        "data.participant_labels=['s000', 's003', 's006', 's009', 's012', 's015']",
        "data.val_fraction=0.2",
        f"work_dir='{tmp_path / 'work'}'", f"export.models_dir='{tmp_path / 'models'}'",
        "input.spacing_mm=2.0", "input.shape=[32, 32, 16]", "optim.max_epochs=1",
        "optim.batch_size=2", "runtime.device='cpu'", "runtime.progress=false",
        "export.robustness_spacings_mm=[]"])
    assert config.optim.lr == 1e-4 and config.optim.betas == (0.9, 0.9)
    assert config.model["block_config"] == [6, 12, 32, 32] and config.model["growth_rate"] == 32
    run_training(config, folds=[0], export=False)
    state = torch.load(tmp_path / "work" / "fold0" / "checkpoint_final.pt", weights_only=True)
    n_params = sum(v.numel() for k, v in state["model"].items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                      "target_offset", "target_scale")))
    assert n_params == 20_386_945
    assert (tmp_path / "work" / "fold0" / "evaluation.json").is_file()
