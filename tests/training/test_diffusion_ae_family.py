"""The diffusion-ae family (seed 001) in the training engine: config checks, hidden ages, joint
loss on synthetic data, export, and the shipped configurations."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bidsapp.errors import UsageError
from bidsapp.inference.weights import sha256_file
from training.config import load_config
from training.data import InputCache, ScanRecord, collect_records
from training.diffusion_ae import DiffusionAEFamily, DiffusionAETrainer, hidden_age_participants
from training.distributed import DistContext
from training.families import get_family
from training.run import run_training
from training.synthetic import make_synthetic_dataset
from training_configs import engine_config_text

AGES = tuple(np.round(np.linspace(20, 85, 16), 2))
CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
TINY = {"channels": [8, 8, 16], "num_res_blocks": 1, "attention_blocks": 1,
        "attention_head_channels": 8, "norm_num_groups": 8, "embed_dim": 32, "latent_dim": 16,
        "age_hidden": [8, 4]}
INPUT = {"grid_size": 40, "size": 32, "neighbour_slices": 1, "neighbour_step": 3}


# small networks gain nothing from more threads (see the fixture's docstring)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """16 participants aged 20-85 with the participant-level MNI-space T1w."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("mni"), AGES, shape=(12, 12, 12),
                                  mni=True)


def _config(synthetic, root: Path, model: dict, *, epochs: int = 6, folds: int = 2) -> Path:
    path = root / "config.toml"
    path.write_text(engine_config_text(
        "diffusion-ae", *synthetic, root / "work", root / "models", seed=4, folds=folds,
        val_fraction=0.15, model={**TINY, **model}, inputs=INPUT,
        optim={"lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "batch_size": 3,
               "max_epochs": epochs, "plateau_patience": 100},
        export={"fp16": "never", "robustness_spacings_mm": [], "ridge_baseline": False}))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_config_checks():
    family = get_family("diffusion-ae", {}, {})
    assert isinstance(family, DiffusionAEFamily)
    assert family.net_kwargs() == {"spatial_dims": 2, "in_channels": 1}  # the paper's defaults
    assert (family.spec.grid_size, family.spec.size, family.spec.neighbour_slices) == (130, 128, 0)
    assert (family.age_loss_weight, family.hide_age_fraction, family.unlabelled) \
        == (1.0, 0.0, "use")
    assert family.architecture()["n_parameters"] == 9_593_794
    bad = [({"chanels": [8]}, "unknown key"), ({"channels": [8, 12]}, "multiple of"),
           ({"hide_age_fraction": 1.0}, "hide_age_fraction"), ({"unlabelled": "keep"}, "'use'"),
           ({"mc_samples": 1}, "mc_samples"),
           ({"age_dropout": 0.0, "mc_samples": 10}, "age_dropout"),
           ({"ddim_steps": 2000}, "cannot exceed"), ({"age_loss_weight": -1}, "age_loss_weight"),
           ({"hide_age_seed": -1}, "hide_age_seed")]
    for params, message in bad:
        with pytest.raises(UsageError, match=message):
            get_family("diffusion-ae", params, {})
    with pytest.raises(UsageError, match="multiple of 16"):
        get_family("diffusion-ae", {}, {"size": 72})
    with pytest.raises(UsageError, match="neighbour_step"):
        get_family("diffusion-ae", {}, {"neighbour_step": 0})


def _records(ages, scans_per_participant=1):
    return [ScanRecord(f"sub-p{i:02d}_ses-{s}", f"p{i:02d}", Path("t"), Path("m"), float(a) + s)
            for i, a in enumerate(ages) for s in range(scans_per_participant)]


def test_hidden_participants_are_a_systematic_sample_along_age():
    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 85, 21)
    records = _records(ages, scans_per_participant=2)
    order = [f"p{i:02d}" for i in np.argsort(ages)]
    for seed in range(4):
        hidden = hidden_age_participants(records, 0.5, seed)
        assert len(hidden) in (10, 11)
        # every other participant in age order
        flags = [p in hidden for p in order]
        assert all(a != b for a, b in zip(flags, flags[1:]))
        # the record order does not matter
        assert hidden_age_participants(records[::-1], 0.5, seed) == hidden
    assert len({frozenset(hidden_age_participants(records, 0.5, s)) for s in range(8)}) == 2
    counts = {f: len(hidden_age_participants(records, f, 3)) for f in (0.0, 0.1, 0.25, 0.9)}
    assert counts[0.0] == 0 and counts[0.1] in (2, 3) and counts[0.25] in (5, 6) \
        and counts[0.9] in (18, 19)
    with pytest.raises(ValueError, match="fraction"):
        hidden_age_participants(records, 1.0)


def test_trainer_hides_ages_and_drops_or_keeps_those_scans(synthetic, tmp_path):
    config = load_config(_config(synthetic, tmp_path, {"hide_age_fraction": 0.5}),
                         ["optim.batch_size=2"])
    family = get_family(config.family, config.model, config.input)
    records = collect_records(config.data.bids_dir, config.data.derivatives)
    cache = InputCache(tmp_path / "cache", family.cache_tag(), family.prepare)
    cache.load(records)
    train, val = records[:10], records[10:]
    hidden = hidden_age_participants(train, 0.5, 0)
    labelled = [r for r in train if r.participant not in hidden]
    assert len(hidden) == 5
    dist = DistContext(torch.device("cpu"))
    use = DiffusionAETrainer(config, family, cache, train, val, 0, tmp_path / "use", dist)
    use.initialize()
    assert len(use.train_records) == 10
    # hidden ages are NaN in the batches and never set the output scaling
    seen = {}
    for x, y in use.train_batches(0):
        assert x.shape[1:] == (1, 32, 32)
        for age in y[:, 0].tolist():
            seen[math.isnan(age)] = seen.get(math.isnan(age), 0) + 1
    assert seen == {True: 5, False: 5}
    ages = np.array([r.age for r in labelled])
    assert float(use.network.target_offset) == pytest.approx(ages.mean(), rel=1e-6)
    assert float(use.network.target_scale) == pytest.approx(ages.std(), rel=1e-6)
    assert use.age_labels["hidden_participants"] == sorted(hidden)
    assert (use.age_labels["labelled_scans"], use.age_labels["unlabelled_scans_used"]) == (5, 5)
    # "drop": the same labelled scans, no others
    dropped = get_family(config.family, {**config.model, "unlabelled": "drop"}, config.input)
    drop = DiffusionAETrainer(config, dropped, cache, train, val, 0, tmp_path / "drop", dist)
    drop.initialize()
    assert [r.key for r in drop.train_records] == [r.key for r in labelled]
    assert drop.age_labels["hidden_participants"] == sorted(hidden)
    assert float(drop.network.target_offset) == pytest.approx(ages.mean(), rel=1e-6)
    # a batch of hidden scans only: the age term is exactly 0, the age MLP gets no gradient
    x = torch.from_numpy(np.stack([cache.views(r.key)[0] for r in train[:2]]).astype(np.float32))
    use.network.train()
    terms = use.model(x[:, None], ages=torch.tensor([math.nan, math.nan]))
    assert terms["age"].item() == 0.0
    (terms["diffusion"] + terms["age"]).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in use.network.age_head.parameters())


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """2 folds x 6 epochs of a tiny diffusion-ae on 32^2 slices, half the training ages hidden."""
    root = tmp_path_factory.mktemp("dae")
    result = run_training(load_config(_config(synthetic, root, {"hide_age_fraction": 0.5,
                                                                "ddim_steps": 10, "mc_samples": 5})))
    return root, result


def test_card_reports_the_reconstruction_quality_of_held_out_slices(trained, synthetic):
    """The card pools each fold's held-out SSIM/PSNR; one row recomputed from scratch."""
    from bidsapp.nets import ddim_reconstruct, reconstruction_quality
    from bidsapp.transforms.mni_slice import MNISliceSpec, prepare_slice_views
    from training.families import mni_t1w_path

    root, result = trained
    card = json.loads(Path(result["card"]).read_text())
    quality = card["reconstruction"]
    assert (quality["held_out_scans"], quality["ddim_steps"]) == (len(AGES), 10)
    rows = [row for k in range(2) for row in json.loads(
        (root / "work" / f"fold{k}" / "evaluation.json").read_text())["reconstruction"]["rows"]]
    assert quality["ssim_mean"] == pytest.approx(np.mean([r["ssim"] for r in rows]))
    assert quality["psnr_db_mean"] == pytest.approx(np.mean([r["psnr"] for r in rows]))
    assert all(-1.0 <= r["ssim"] <= 1.0 and np.isfinite(r["psnr"]) for r in rows)
    # the first held-out scan of fold 0, reconstructed again by that fold's best network
    row = json.loads((root / "work" / "fold0" / "evaluation.json").read_text())
    row = row["reconstruction"]["rows"][0]
    records = collect_records(synthetic[0], [synthetic[1]])
    record = next(r for r in records if r.key == row["key"])
    family = get_family("diffusion-ae", TINY, INPUT)
    net = family.build_network()
    state = torch.load(root / "work" / "fold0" / "checkpoint_best.pt", weights_only=True)
    net.load_state_dict(state["model"])
    view = prepare_slice_views(mni_t1w_path(record), MNISliceSpec.from_dict(INPUT))[0]
    image = torch.from_numpy(np.asarray(view, dtype=np.float32))[None, None]
    again = reconstruction_quality(ddim_reconstruct(net.eval(), image, 10), image)
    assert again["ssim"][0] == pytest.approx(row["ssim"], abs=1e-5)
    assert again["psnr"][0] == pytest.approx(row["psnr"], abs=1e-3)


def test_training_lowers_the_loss(trained):
    root, _ = trained
    for k in range(2):
        log = _rows(root / "work" / f"fold{k}" / "metrics.csv")
        terms = _rows(root / "work" / f"fold{k}" / "loss_terms.csv")
        assert len(log) == len(terms) == 6
        # the noise MSE starts near 1 (epsilon_theta = 0 at first) and falls at every epoch
        diffusion = [float(r["diffusion"]) for r in terms]
        assert 0.8 < diffusion[0] < 1.2 and diffusion[-1] < 0.75 * diffusion[0]
        assert all(b < a for a, b in zip(diffusion, diffusion[1:]))
        # the total adds the age MSE of the one or two labelled scans of a batch (noisy): it
        # falls from the first three epochs to the last three
        total = [float(r["train_loss"]) for r in log]
        assert np.mean(total[3:]) < np.mean(total[:3])
        # about half of the scans of a batch have an age
        assert 0.2 < np.mean([float(r["labelled_fraction"]) for r in terms]) < 0.8
        assert all(np.isfinite(float(r["val_mae"])) for r in log)


def test_card_and_hidden_ages_per_fold(trained):
    root, result = trained
    card = json.loads(Path(result["card"]).read_text())
    assert card["family"] == "diffusion-ae" and card["variant"] == "tiny-test"
    assert card["input"]["params"] == {"grid_size": 40, "size": 32, "slice_offset": 0,
                                       "neighbour_slices": 1, "neighbour_step": 3,
                                       "upper_percentile": 100.0}
    # plane 20 of a 40-plane cube over the 190 mm of the template's z axis (4.75 mm planes)
    medial = -72.0 + 2.0 * (20.5 * 95 / 40 - 0.5)
    assert card["input"]["slice_z_mm"] == pytest.approx([medial, medial - 3 * 4.75,
                                                         medial + 3 * 4.75])
    parts = card["architecture"]["n_parameters_by_part"]
    assert sum(parts.values()) == card["architecture"]["n_parameters"]
    assert card["prediction"]["views"] == "all"
    assert "Monte-Carlo dropout" in card["prediction"]["interval"]
    # the card's metrics are of the mean over the 3 prepared slices; the medial slice alone too
    medial = card["prediction"]["medial_slice_only"]["metrics"]
    evaluations = [json.loads((root / "work" / f"fold{k}" / "evaluation.json").read_text())
                   for k in range(2)]
    ages = {r["key"]: r["age"] for e in evaluations for r in e["rows"]}
    rows = [r for e in evaluations for r in e["medial_only"]["rows"]]
    assert medial["n"] == len(AGES)
    assert medial["mae"] == pytest.approx(np.mean([abs(r["predicted"] - ages[r["key"]])
                                                   for r in rows]))
    assert all(len(e["rows"]) == len(e["medial_only"]["rows"]) for e in evaluations)
    assert card["metrics"]["cross_validation"]["pooled"]["n"] == len(AGES)
    for entry in card["weights"]:
        path = Path(result["card"]).parent / entry["file"]
        if not path.is_file():  # cards written beside the model folder name files from models/
            path = root / "models" / entry["file"]
        assert sha256_file(path) == entry["sha256"]
    splits = json.loads((root / "work" / "splits.json").read_text())
    semi = card["semi_supervision"]
    assert (semi["hide_age_fraction"], semi["unlabelled"]) == (0.5, "use")
    for fold in semi["per_fold"]:
        k = fold["fold"]
        labels = json.loads((root / "work" / f"fold{k}" / "age_labels.json").read_text())
        train = set(splits["folds"][k]["train"])
        records = [ScanRecord(f"sub-{p}", p, Path("t"), Path("m"), a)
                   for p, a in zip([f"s{i:03d}" for i in range(len(AGES))], AGES) if p in train]
        assert labels["hidden_participants"] == sorted(hidden_age_participants(records, 0.5, 0))
        assert fold["labelled_scans"] + fold["unlabelled_scans_used"] == len(records)
        state = torch.load(root / "work" / f"fold{k}" / "checkpoint_final.pt", weights_only=True)
        labelled = [r.age for r in records if r.participant not in labels["hidden_participants"]]
        assert float(state["model"]["target_offset"]) == pytest.approx(np.mean(labelled), rel=1e-5)
        assert state["trainer"] == "DiffusionAETrainer"


def test_shipped_configs():
    cpu = load_config(CONFIGS / "diffusion-ae-cpu.toml")
    family = get_family(cpu.family, cpu.model, cpu.input)
    assert cpu.export.variant == "reduced-cpu" and family.spec.size == 64
    assert family.architecture()["n_parameters"] == 1_932_306
    arms = [load_config(CONFIGS / f"diffusion-ae-semisup-{name}.toml")
            for name in ("labelled-only", "with-unlabelled")]
    assert [a.model["unlabelled"] for a in arms] == ["drop", "use"]
    # the arms differ in nothing that changes which ages are hidden, nor in the network
    first, second = (a.to_dict() for a in arms)
    for table in (first, second):
        table["model"].pop("unlabelled")
        table.pop("work_dir")
        for key in ("model_id", "variant", "notes"):
            table["export"].pop(key)
    assert first == second
    # and they are the reduced CPU configuration with half the training ages hidden
    hide = ("hide_age_fraction", "hide_age_seed", "unlabelled")
    assert {k: v for k, v in arms[0].model.items() if k not in hide} \
        == {k: v for k, v in cpu.model.items() if k not in hide}
    assert (arms[0].model["hide_age_fraction"], arms[0].model["hide_age_seed"]) == (0.5, 0)
    assert (arms[0].input, arms[0].seed, arms[0].data.folds) \
        == (cpu.input, cpu.seed, cpu.data.folds)
    # with a shorter schedule
    shorter = {"max_epochs": 250, "early_stopping_patience": 30}
    assert dataclasses.replace(cpu.optim, **shorter) == arms[0].optim


def test_full_config_builds_the_paper_network_and_takes_a_joint_step(tmp_path):
    config = load_config(CONFIGS / "diffusion-ae-full.toml", [f"work_dir='{tmp_path}'",
                                                             "runtime.device='cpu'"])
    family = get_family(config.family, config.model, config.input)
    assert (family.spec.grid_size, family.spec.size) == (130, 128)
    records = [ScanRecord(f"sub-{i}", str(i), Path("t1w"), Path("mask"), 30.0 + 10 * i)
               for i in range(3)]
    trainer = family.trainer_class()(config, family, None, records, records[:1], 0, tmp_path,
                                    DistContext(torch.device("cpu")))
    trainer.initialize()
    net = trainer.network
    assert sum(p.numel() for p in net.parameters()) == 9_593_794
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    # one step on a tiny synthetic batch (two 128^2 slices, one age hidden)
    x = torch.rand(2, 1, 128, 128)
    y = torch.tensor([[35.0], [math.nan]])
    before = [p.detach().clone() for p in net.parameters()]
    net.train()
    torch.manual_seed(11)
    with torch.no_grad():
        terms = net.training_losses(x, y[:, 0])
    expected = float(terms["diffusion"] + terms["age"])
    torch.manual_seed(11)  # the same timesteps, noise and dropout masks
    loss = trainer.train_step(x, y)
    assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-5)
    assert int(terms["n_labelled"]) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
