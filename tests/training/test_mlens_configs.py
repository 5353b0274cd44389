"""The shipped mlens configs parse; the paper-size network builds and trains one step."""

from __future__ import annotations

from pathlib import Path

import torch

from training.config import load_config
from training.families import get_family

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def test_reduced_cpu_config_is_valid():
    config = load_config(CONFIGS / "mlens-cpu.toml")
    family = get_family(config.family, config.model, config.input)
    assert config.export.variant == "reduced-cpu" and "Reduced CPU" in config.export.notes
    assert family.ensemble_type == "i" and family.n_base == 5 and family.subensembles == ["T1w-whole"]
    base = family.base_family("T1w-whole")
    assert base.spec.resolution_mm == 4.0 and base.in_shape == (42, 50, 42)
    assert len(family.members()) == 5 and config.optim.lr == 5e-4
    assert config.export.robustness_spacings_mm == ()
    assert config.optim.restart_stalled == 3 and config.optim.stall_ratio == 0.9


def test_full_config_builds_the_paper_network_and_trains_one_step():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config(CONFIGS / "mlens-full.toml")
    family = get_family(config.family, config.model, config.input)
    assert config.data.folds == 10 and config.data.val_fraction == 0.1   # 8:1:1
    assert family.n_base == 10 and family.head_alpha == 1.0
    base = family.base_family("T1w-whole")
    assert base.spec.resolution_mm == 2.0 and base.in_shape == (77, 94, 80)
    net = family.build_network()
    assert sum(p.numel() for p in net.parameters()) == 134_097
    # one Adam step of the configured network on a batch of two (random) full-size inputs
    net.set_target_scaling(50.0, 15.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.optim.lr, betas=config.optim.betas)
    x, y = torch.rand(2, 1, 77, 94, 80) * 255, torch.tensor([[30.0], [70.0]])
    before = [p.detach().clone() for p in net.parameters()]
    loss = torch.mean((net(x) - y) ** 2)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    type_ii = get_family("mlens", {**config.model, "ensemble_type": "ii", "base_models": 5},
                         config.input)
    assert type_ii.subensembles == ["T1w-cortical", "T1w-subcortical", "T1w-cerebellum"]
    assert len(type_ii.members()) == 15
