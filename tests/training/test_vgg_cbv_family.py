"""The vgg-cbv family (T1w branch) end to end on tiny synthetic data, and the full-size config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch

from bidsapp.inference.weights import sha256_file
from training.config import load_config
from training.data import ScanRecord
from training.distributed import DistContext
from training.families import get_family
from training.run import run_training
from training.synthetic import make_synthetic_dataset
from training_configs import tiny_vgg_cbv_config_text

AGES = tuple(np.round(np.linspace(20, 85, 10), 2))
CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 folds x 2 epochs of a tiny VGG8 on 8 mm inputs (32^3 voxels)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vgg")
    bids, derivs = make_synthetic_dataset(root / "data", AGES, shape=(16, 16, 16), mni=True)
    cfg = root / "vgg.toml"
    cfg.write_text(tiny_vgg_cbv_config_text(bids, derivs, root / "work", root / "models"))
    result = run_training(load_config(cfg))
    card = json.loads(Path(result["card"]).read_text())
    with open(root / "models" / "vgg-cbv" / "cv_predictions.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return root, card, rows


def test_card_weights_and_predictions(trained):
    root, card, rows = trained
    assert card["family"] == "vgg-cbv" and card["variant"] == "tiny-test"
    assert card["architecture"]["params"]["branch"] == "t1w"
    assert card["architecture"]["loss"].startswith("L1")
    assert card["input"]["params"] == {"resolution_mm": 8.0, "shape": [32, 32, 32], "top_fraction": 0.01}
    assert len(card["weights"]) == 2
    for entry in card["weights"]:
        assert sha256_file(root / "models" / "vgg-cbv" / entry["file"]) == entry["sha256"]
    assert sorted(r["participant"] for r in rows) == [f"s{i:03d}" for i in range(10)]
    pooled = card["metrics"]["cross_validation"]["pooled"]
    assert pooled["n"] == 10 and np.isfinite(pooled["mae"])


def test_training_minimised_a_finite_l1_loss(trained):
    root, _, _ = trained
    for k in range(2):
        with open(root / "work" / f"fold{k}" / "metrics.csv") as handle:
            log = list(csv.DictReader(handle))
        assert len(log) == 2
        scale = float(torch.load(root / "work" / f"fold{k}" / "checkpoint_final.pt",
                                 weights_only=True)["model"]["target_scale"])
        for row in log:
            assert np.isfinite(float(row["train_loss"]))
            # the L1 trainer's validation loss is the MAE in units of the output scale
            assert float(row["val_loss"]) == pytest.approx(float(row["val_mae"]) / scale, rel=1e-6)
        assert torch.load(root / "work" / f"fold{k}" / "checkpoint_final.pt",
                          weights_only=True)["trainer"] == "L1Trainer"


def test_card_stacking_matches_statsmodels_on_the_cv_predictions(trained):
    root, card, _ = trained
    # the folds' unrounded held-out predictions (the TSV rounds to 1e-3 y)
    rows = [dict(r, fold=k) for k in (0, 1) for r in json.loads(
        (root / "work" / f"fold{k}" / "evaluation.json").read_text())["rows"]]
    frame = pd.DataFrame({"fold": [r["fold"] for r in rows], "age": [r["age"] for r in rows],
                          "t1w": [r["predicted"] for r in rows],
                          "male": [float(r["sex"] == "M") for r in rows]})
    stacking = card["stacking"]
    assert sorted(stacking["stacks"]) == ["T", "TS"]
    for stack, cols in (("T", ["t1w"]), ("TS", ["t1w", "male"])):
        errors = []
        for k in (0, 1):  # cross-fitted: fitted on the other fold's held-out predictions
            fit, test = frame[frame.fold != k], frame[frame.fold == k]
            model = sm.OLS(fit["age"], sm.add_constant(fit[cols])).fit()
            errors += list(np.abs(model.predict(sm.add_constant(test[cols])) - test["age"]))
        assert stacking["stacks"][stack]["cv_mae"] == pytest.approx(np.mean(errors), rel=1e-6)
        # the coefficients the app applies: fitted on every fold's held-out predictions
        pooled = sm.OLS(frame["age"], sm.add_constant(frame[cols])).fit()
        assert stacking["stacks"][stack]["columns"] == ["t1w", "sex"][:len(cols)]
        np.testing.assert_allclose(stacking["stacks"][stack]["coef"], pooled.params, rtol=1e-9)
    (test,) = stacking["f_tests"]
    assert (test["restricted"], test["full"], test["df_num"]) == ("T", "TS", 1)
    assert 0 <= test["p"] <= 1
    bands = stacking["mae_by_age_band"]
    assert sum(b["n"] for b in bands.values()) == 10
    band = bands["20-25"]
    young = frame[(frame.age >= 20) & (frame.age < 25)]
    assert band["network"] == pytest.approx(np.mean(np.abs(young.t1w - young.age)), rel=1e-9)
    assert list(stacking["mae_by_site"]) == ["n/a"]


def test_full_config_builds_the_paper_network_and_takes_an_l1_step(tmp_path):
    config = load_config(CONFIGS / "vgg-cbv-full.toml", [f"work_dir='{tmp_path}'",
                                                         "runtime.device='cpu'"])
    assert (config.optim.lr, config.optim.batch_size, config.optim.max_epochs,
            config.optim.early_stopping_patience) == (1e-4, 3, 100, 10)
    family = get_family(config.family, config.model, config.input)
    net = family.build_network()
    assert net.in_shape == (80, 96, 80) and family.spec.resolution_mm == 2.0
    assert sum(p.numel() for p in net.parameters()) == 2_816_129
    # one step of the family's trainer on a random paper-size input (batch 2, not 3: ~1-2 s)
    records = [ScanRecord(f"sub-{i}", str(i), Path("t1w"), Path("mask"), 30.0 + 10 * i) for i in range(3)]
    trainer = family.trainer_class()(config, family, None, records, records[:1], 0, tmp_path,
                                    DistContext(torch.device("cpu")))
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    x, y = torch.rand(2, 1, 80, 96, 80), torch.tensor([[30.0], [50.0]])
    trainer.network.train()
    with torch.no_grad():
        expected = float(torch.mean(torch.abs(trainer.network(x) - y)) / trainer.network.target_scale)
    loss = trainer.train_step(x, y)
    assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
