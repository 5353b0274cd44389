"""The local-unet family (seed 000) in the training engine: config checks, the decaying
auxiliary losses of eq. 5, learning a planted age effect, export with voxel-level metrics, and
the shipped configurations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import training.local_unet as local_unet
from bidsapp.errors import UsageError
from bidsapp.inference.weights import sha256_file
from training.config import load_config
from training.families import LocalUNetFamily, get_family
from training.run import run_training
from training.synthetic import make_synthetic_dataset
from training_configs import engine_config_text

AGES = tuple(np.round(np.linspace(20, 85, 18), 2))
CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
# the paper's topology at 8 mm: depth 2 (two auxiliary heads), one convolution per scale, 30 -> 10
TINY = {"init_channels": 2, "depth": 2, "convs_per_scale": 1, "block_size": 30}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """18 participants aged 20-85 with modulated GM/WM maps on the 2 mm template grid."""
    torch.set_num_threads(1)
    return make_synthetic_dataset(tmp_path_factory.mktemp("modulated"), AGES, shape=(12, 12, 12),
                                  modulated=True)


def _config(synthetic, root: Path, model: dict, *, epochs: int, lr: float = 1e-3,
            batch: int = 4, folds: int = 3, seed: int = 3, ridge: bool = False) -> Path:
    path = root / "config.toml"
    path.write_text(engine_config_text(
        "local-unet", *synthetic, root / "work", root / "models", seed=seed, folds=folds,
        val_fraction=0.15, model=model, inputs={"resolution_mm": 8.0},
        optim={"lr": lr, "betas": [0.9, 0.999], "weight_decay": 0.0, "batch_size": batch,
               "max_epochs": epochs, "plateau_patience": 100},
        export={"fp16": "never", "robustness_spacings_mm": [], "ridge_baseline": ridge}))
    return path


def test_config_checks():
    family = get_family("local-unet", {}, {})
    assert (family.in_size, family.out_size, family.margin) == (52, 12, 20)
    assert family.aux_weights == [1.0, 1.0] and family.spec.resolution_mm == 1.5
    assert family.net_kwargs()["init_channels"] == 64 and family.tile_stride == 12
    bad = [({"blocksize": 52}, "unknown key"), ({"block_size": 50}, "must be even"),
           ({"aux_weights": [1.0]}, "2 non-negative"), ({"tile_stride": 13}, "tile_stride"),
           ({"mc_samples": 4}, "dropout > 0"), ({"blocks_per_scan": 0}, "blocks_per_scan")]
    for params, message in bad:
        with pytest.raises(UsageError, match=message):
            get_family("local-unet", params, {})
    with pytest.raises(UsageError, match="resolution_mm"):
        get_family("local-unet", {}, {"resolution_mm": 1.0})
    assert isinstance(get_family("local-unet", {"dropout": 0.1, "mc_samples": 4}, {}),
                      LocalUNetFamily)


def test_auxiliary_weights_decay_linearly_to_zero(synthetic, tmp_path, monkeypatch):
    calls, snapshots = [], []
    original = local_unet.aux_loss_weights

    def recording(step, initial, decay_steps):
        calls.append((step, original(step, initial, decay_steps), decay_steps))
        return calls[-1][1]

    class Recording(local_unet.LocalUNetTrainer):
        def on_epoch_end(self, epoch, train_loss, val):
            snapshots.append({k: v.clone() for k, v in self.network.state_dict().items()
                              if k.startswith(("aux_heads", "output"))})
            self.spe = self.steps_per_epoch
            super().on_epoch_end(epoch, train_loss, val)

    monkeypatch.setattr(local_unet, "aux_loss_weights", recording)
    model = {**TINY, "aux_weights": [1.0, 0.5], "aux_decay_epochs": 2, "blocks_per_scan": 2,
             "val_blocks": 2}
    config = load_config(_config(synthetic, tmp_path, model, epochs=3))
    run_training(config, folds=[0], export=False, trainer_cls=Recording)
    steps = [c[0] for c in calls]
    spe = len(steps) // 3
    assert steps == list(range(3 * spe)) and spe >= 2 and {c[2] for c in calls} == {2 * spe}
    for step, weights, _ in calls:
        factor = max(0.0, 1.0 - step / (2 * spe))
        assert weights == pytest.approx([1.0 * factor, 0.5 * factor])
    assert calls[0][1] == [1.0, 0.5] and all(c[1] == [0.0, 0.0] for c in calls[2 * spe:])

    def same(a, b, prefix):
        return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    # while they have weight, the heads learn; in the third epoch only the voxel loss is left
    assert not same(snapshots[0], snapshots[1], "aux_heads")
    assert same(snapshots[1], snapshots[2], "aux_heads")
    assert not same(snapshots[1], snapshots[2], "output")


def test_learns_a_planted_age_effect(synthetic, tmp_path):
    # one fold, depth 1 for speed (20^3 -> 12^3 blocks at 8 mm, 4 channels): about 800 steps
    model = {"init_channels": 4, "depth": 1, "convs_per_scale": 1, "block_size": 20,
             "aux_weights": [1.0], "aux_decay_epochs": 15, "blocks_per_scan": 16}
    config = load_config(_config(synthetic, tmp_path, model, epochs=40, lr=5e-3, batch=8))
    result = run_training(config, folds=[0], export=False)["folds"][0]
    splits = json.loads((tmp_path / "work" / "splits.json").read_text())["folds"][0]
    age = {f"s{i:03d}": a for i, a in enumerate(AGES)}
    mean_age = np.mean([age[p] for p in splits["train"] + splits["val"]])
    mean_mae = np.mean([abs(age[p] - mean_age) for p in splits["test"]])
    metrics = result["metrics"]
    assert metrics["n"] == len(splits["test"]) == 6
    assert metrics["mae"] < 0.6 * mean_mae  # ~7.7 y against ~18.5 y for the training mean
    assert metrics["r"] > 0.8
    for row in result["rows"]:  # a map's voxel MAE is at least the error of its mean
        assert row["voxel_mae"] >= abs(row["predicted"] - row["age"]) - 1e-6


def test_export_writes_card_with_voxel_level_metrics(synthetic, tmp_path):
    model = {**TINY, "blocks_per_scan": 2, "val_blocks": 0, "dropout": 0.1, "mc_samples": 2,
             "tile_stride": 5}
    config = load_config(_config(synthetic, tmp_path, model, epochs=1, ridge=True))
    card_path = run_training(config)["card"]
    card = json.loads(Path(card_path).read_text())
    assert card["family"] == "local-unet" and len(card["weights"]) == 3
    for entry in card["weights"]:
        assert sha256_file(tmp_path / "models" / "local-unet" / entry["file"]) == entry["sha256"]
    arch = card["architecture"]
    assert arch["blocks"] == {"in_size": 30, "out_size": 10, "margin": 10, "tile_stride": 5,
                              "mc_samples": 2, "receptive_field_voxels": 21}
    assert arch["net_kwargs"]["depth"] == 2 and arch["net_kwargs"]["act"][0] == "leakyrelu"
    assert card["input"]["params"] == {"resolution_mm": 8.0, "fwhm_mm": 4.0}
    rows = [r for k in range(3) for r in json.loads(
        (tmp_path / "work" / f"fold{k}" / "evaluation.json").read_text())["rows"]]
    voxel = card["metrics"]["voxel_level"]
    assert voxel["n"] == len(rows) == 18
    assert voxel["median_within_participant_voxel_mae"] == pytest.approx(
        float(np.median([r["voxel_mae"] for r in rows])))
    pooled = card["metrics"]["cross_validation"]["pooled"]
    assert pooled["mae"] == pytest.approx(np.mean([abs(r["predicted"] - r["age"]) for r in rows]))
    assert card["metrics"]["ridge_baseline"]["pooled"]["n"] == 18
    assert "2 Monte-Carlo dropout samples" in card["prediction"]["ensemble"]
    assert card["prediction"]["interval"].startswith("95% interval of the global values")
    with open(tmp_path / "models" / "local-unet" / "cv_predictions.tsv") as handle:
        assert len(list(csv.DictReader(handle, delimiter="\t"))) == 18


def test_reduced_cpu_config_is_valid():
    config = load_config(CONFIGS / "local-unet-cpu.toml")
    family = get_family(config.family, config.model, config.input)
    assert config.export.variant == "reduced-cpu" and "Reduced CPU" in config.export.notes
    assert family.spec.resolution_mm == 2.0 and family.spec.source_resolution_mm == 2.0
    assert (family.in_size, family.out_size) == (60, 20) and family.val_blocks == 8
    assert sum(p.numel() for p in family.build_network().parameters()) == 87_147
    assert config.export.robustness_spacings_mm == ()


def test_full_config_builds_the_paper_network_and_trains_one_step():
    config = load_config(CONFIGS / "local-unet-full.toml")
    family = get_family(config.family, config.model, config.input)
    assert family.spec.resolution_mm == 1.5 and family.spec.fwhm_mm == 4.0
    assert (family.in_size, family.out_size) == (52, 12) and config.optim.lr == 1e-4
    assert family.aux_weights == [1.0, 1.0] and config.optim.batch_size == 32
    net = family.build_network()
    assert sum(p.numel() for p in net.parameters()) == 5_448_275
    # one Adam step of eq. 5 on a real-size block (batch 1: about 4 s on one CPU thread)
    torch.manual_seed(0)
    net.set_target_scaling(50.0, 15.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.optim.lr)
    voxel, aux = net(torch.rand(1, 2, 52, 52, 52), return_aux=True)
    assert voxel.shape == (1, 1, 12, 12, 12) and [a.shape for a in aux] == [(1, 1), (1, 1)]
    loss = torch.mean(torch.abs(voxel - 70.0)) + sum(torch.mean(torch.abs(a - 70.0)) for a in aux)
    before = [p.detach().clone() for p in net.parameters()]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    unchanged = {name for (name, p), b in zip(net.named_parameters(), before) if torch.equal(p, b)}
    # the first step reaches everything but the finest decoder level (behind the zero-initialised
    # output convolution, which itself moves) and the squeeze layers of the excitation units
    # (behind their zero-initialised excitation layers, which move)
    assert {n for n in unchanged if ".se.fc." not in n} == {
        "up.1.weight", "up.1.bias", "decoder.1.conv0.conv.weight", "decoder.1.conv0.conv.bias",
        "decoder.1.conv1.conv.weight", "decoder.1.conv1.conv.bias"}
    assert not any(".se.fc.2." in n for n in unchanged if not n.startswith("decoder.1."))
    assert "output.weight" not in unchanged


def test_input_statistics_are_the_voxelwise_mean_and_floored_sd():
    rng = np.random.default_rng(4)
    views = [rng.normal(size=(2, 4, 3, 3)) for _ in range(5)]
    views[0][:, 0] = views[1][:, 0] = views[2][:, 0] = views[3][:, 0] = views[4][:, 0] = 1.0
    mask = np.zeros((4, 3, 3), bool)
    mask[1:] = True
    mean, sd = local_unet.input_statistics(views, mask, floor_fraction=0.2)
    stack = np.stack(views)
    np.testing.assert_allclose(mean, stack.mean(axis=0), rtol=1e-5, atol=1e-6)
    raw = stack.std(axis=0)  # population SD (ddof 0)
    floor = 0.2 * np.median(raw[:, mask], axis=1)
    np.testing.assert_allclose(sd, np.maximum(raw, floor[:, None, None, None]), rtol=1e-5)
    assert np.allclose(sd[:, 0], floor[:, None, None])  # the constant plane gets the floor


def test_standardizing_network_learns_its_fold_statistics_and_is_evaluated_on_z_scores(
        synthetic, tmp_path):
    from bidsapp.inference.local_unet import tiled_age_map
    from bidsapp.nets import LocalUNet
    from training.data import collect_records

    model = {**TINY, "blocks_per_scan": 2, "val_blocks": 2, "standardize_input": True}
    config = load_config(_config(synthetic, tmp_path, model, epochs=1))
    result = run_training(config, folds=[0], export=False)["folds"][0]
    family = get_family(config.family, config.model, config.input)
    splits = json.loads((tmp_path / "work" / "splits.json").read_text())["folds"][0]
    records = {r.participant: r for r in collect_records(config.data.bids_dir,
                                                         config.data.derivatives)}
    # the engine caches prepared inputs as float16
    train = [family.prepare(records[p])[0].astype(np.float16) for p in splits["train"]]
    mean, sd = local_unet.input_statistics(train, family.mask)
    state = torch.load(tmp_path / "work" / "fold0" / "checkpoint_best.pt", weights_only=True)
    np.testing.assert_allclose(state["model"]["input_mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["model"]["input_std"].numpy(), sd, rtol=1e-5)
    # the held-out value is the tiled map of the same weights on the z-scored input
    kwargs = family.net_kwargs()
    kwargs["act"] = tuple(kwargs.pop("act"))
    assert kwargs.pop("input_shape") == [2, *family.mask.shape]
    raw = LocalUNet(**kwargs).eval()
    raw.load_state_dict({k: v for k, v in state["model"].items()
                         if k not in ("input_mean", "input_std")})
    row = result["rows"][0]
    data = family.prepare(records[row["participant"]])[0].astype(np.float16)
    z = (data.astype(np.float32) - mean) / sd
    manual = tiled_age_map(raw, z, family.mask, family.in_size, family.out_size)
    assert row["predicted"] == pytest.approx(float(np.nanmean(manual[family.mask])), rel=1e-5)
