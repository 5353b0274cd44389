"""The mlens family end to end on tiny synthetic data: engine-trained base models, ridge heads
on validation predictions, top level, per-level CV metrics, interval coverage, inference."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from bidsapp.errors import UsageError
from bidsapp.inference.mlens import MLensPredictor, fold_halfwidth
from bidsapp.inference.weights import sha256_file
from bidsapp.transforms.mni_pruned import MNIPrunedSpec, pruning_box
from training.__main__ import main
from training.config import config_from_dict, load_config
from training.ensemble import conformal_halfwidth, fit_ridge, grouped_folds
from training.families import get_family
from training.run import run_training
from training.synthetic import make_synthetic_dataset
from training_configs import engine_config_text

AGES = tuple(np.round(np.linspace(20, 85, 15), 2))
SUBS = ["T1w-cortical", "T1w-subcortical", "T1w-cerebellum"]


def _config(bids, derivs, root, *, ensemble_type="ii", folds=3, epochs=4):
    return engine_config_text(
        "mlens", bids, derivs, root / "work", root / "models", seed=5, folds=folds,
        val_fraction=0.2,
        model={"ensemble_type": ensemble_type, "base_models": 2, "filters": [4, 4, 8, 8, 4],
               "dense_units": 8, "top_folds": 3},
        inputs={"resolution_mm": 8.0},
        optim={"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "batch_size": 4,
               "max_epochs": epochs, "plateau_patience": 100},
        export={"fp16": "never", "robustness_spacings_mm": []})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("mni"), AGES, shape=(20, 24, 20), mni=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A 3-fold type-ii run through the CLI (3 regions x 2 base models per fold)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mlens")
    cfg = root / "mlens.toml"
    cfg.write_text(_config(*data, root))
    assert main([str(cfg)]) == 0
    card = json.loads((root / "models" / "mlens" / "model_card.json").read_text())
    with open(root / "models" / "mlens" / "cv_predictions.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return root, card, rows


def _mni(derivs, participant):
    return next((derivs / f"sub-{participant}" / "anat").glob("*space-MNI152NLin2009aSym*T1w.nii.gz"))


def test_card_lists_every_base_model_with_checked_weights(trained):
    root, card, rows = trained
    assert card["family"] == "mlens" and card["ensemble"]["type"] == "ii"
    assert [s["name"] for s in card["ensemble"]["subensembles"]] == SUBS
    assert len(card["weights"]) == 3 * 3 * 2
    assert {(w["fold"], w["subensemble"], w["member"]) for w in card["weights"]} == {
        (k, s, b) for k in range(3) for s in SUBS for b in range(2)}
    # every base network lies next to the card, its sub-ensemble in its name
    folder = root / "models" / "mlens"
    assert sorted(w["file"] for w in card["weights"]) == sorted(p.name for p in folder.glob("*.pt"))
    assert not [p for p in folder.iterdir() if p.is_dir()]
    for entry in card["weights"]:
        member, fold = entry["member"], entry["fold"]
        assert entry["file"] == f"{entry['subensemble']}_base{member:02d}_fold{fold}.pt"
        assert sha256_file(folder / entry["file"]) == entry["sha256"]
    assert (folder / card["split"]["file"]).is_file()
    assert (folder / card["metrics"]["cross_validation"]["predictions"]).is_file()
    for sub in card["ensemble"]["subensembles"]:
        box = pruning_box(MNIPrunedSpec(resolution_mm=8.0, region=sub["region"]))
        assert sub["input"]["box"] == [[s.start, s.stop] for s in box]
    # the engine trained each base model in its own folder, from its own seed
    w0 = torch.load(root / "work" / "T1w-cortical" / "base00" / "fold0" / "checkpoint_final.pt",
                    weights_only=True)["model"]["features.conv0.weight"]
    w1 = torch.load(root / "work" / "T1w-cortical" / "base01" / "fold0" / "checkpoint_final.pt",
                    weights_only=True)["model"]["features.conv0.weight"]
    assert not torch.equal(w0, w1)
    assert sorted(r["participant"] for r in rows) == [f"s{i:03d}" for i in range(15)]


def test_heads_are_ridge_on_the_validation_predictions(trained, data):
    root, card, _ = trained
    _, derivs = data
    splits = json.loads((root / "models" / "mlens" / "splits.json").read_text())
    ages = dict(zip((f"s{i:03d}" for i in range(15)), AGES))
    predictor = MLensPredictor(card, root / "models" / "mlens")
    for k in range(3):
        val = splits["folds"][k]["val"]
        keys = [f"sub-{p}" for p in val]
        inference = [predictor.predict_prepared(predictor.prepare(_mni(derivs, p)), folds=[k])
                     for p in val]
        for j, (s, head) in enumerate(zip(SUBS, card["ensemble"]["heads"][k])):
            # the validation predictions the head was fitted on are the base models' own ...
            base = np.array([[json.loads((root / "work" / s / f"base{b:02d}" / f"fold{k}" /
                                          "val_predictions.json").read_text())[key]
                              for b in range(2)] for key in keys])
            np.testing.assert_allclose(base, [r.base_predictions[s][0] for r in inference],
                                       atol=1e-3)
            # ... and the head is scikit-learn's Ridge(alpha=1) on them
            reference = Ridge(alpha=1.0).fit(base, [ages[p] for p in val])
            np.testing.assert_allclose(head["coef"], reference.coef_, rtol=1e-6, atol=1e-8)
            assert head["intercept"] == pytest.approx(reference.intercept_, rel=1e-8)
            assert head["n_val"] == len(val)


def test_cv_rows_are_reproduced_by_inference_with_the_fold_ensemble(trained, data):
    root, card, rows = trained
    predictor = MLensPredictor(card, root / "models" / "mlens")
    for row in rows[:4]:
        result = predictor.predict_prepared(predictor.prepare(_mni(data[1], row["participant"])),
                                            folds=[int(row["fold"])])
        for s in SUBS:
            assert result.subensembles[s] == pytest.approx(float(row[f"sub_{s}"]), abs=2e-3)
            for b in range(2):
                assert result.base_predictions[s][0][b] == pytest.approx(
                    float(row[f"base_{s}_{b:02d}"]), abs=2e-3)


def test_top_level_and_per_level_metrics(trained):
    _, card, rows = trained
    ages = np.array([float(r["age"]) for r in rows])
    sub = np.array([[float(r[f"sub_{s}"]) for s in SUBS] for r in rows])
    mlens = np.array([float(r["mlens"]) for r in rows])
    # MLens CV predictions: ridge (alpha 1) in an inner 3-fold CV over participants
    folds = grouped_folds([r["participant"] for r in rows], ages, 3, seed=5)
    for f in range(3):
        test = folds == f
        reference = Ridge(alpha=1.0).fit(sub[~test], ages[~test])
        # (the table rounds to 1e-3 y, which the ridge amplifies a little)
        np.testing.assert_allclose(mlens[test], reference.predict(sub[test]), atol=2e-2)
    top = Ridge(alpha=1.0).fit(sub, ages)
    np.testing.assert_allclose(card["ensemble"]["top"]["coef"], top.coef_, rtol=1e-3, atol=1e-4)
    levels = card["metrics"]["cross_validation"]["levels"]
    assert levels["mlens"]["mae"] == pytest.approx(np.mean(np.abs(mlens - ages)), abs=2e-3)
    assert card["metrics"]["cross_validation"]["pooled"]["mae"] == pytest.approx(levels["mlens"]["mae"])
    for j, s in enumerate(SUBS):
        assert levels["subensemble"][s]["mae"] == pytest.approx(np.mean(np.abs(sub[:, j] - ages)), abs=2e-3)
        maes = [np.mean(np.abs([float(r[f"base_{s}_{b:02d}"]) for r in rows] - ages)) for b in range(2)]
        np.testing.assert_allclose(levels["base"][s]["mae_per_model"], maes, atol=2e-3)
        assert levels["base"][s]["mae_min"] == pytest.approx(min(maes), abs=2e-3)
    best_base = min(v["mae_min"] for v in levels["base"].values())
    assert card["metrics"]["cross_validation"]["ensemble_beats_best_base_model"] == (
        levels["mlens"]["mae"] < best_base)
    # the ridge baseline on the same (pruned MNI) inputs, same folds, every held-out scan once
    ridge = card["metrics"]["ridge_baseline"]
    assert ridge["pooled"]["n"] == len(rows)
    assert [f["fold"] for f in ridge["per_fold"]] == sorted({int(r["fold"]) for r in rows})
    assert np.isfinite(ridge["pooled"]["mae"]) and ridge["pooled"]["mae"] > 0


def test_interval_and_its_coverage(trained):
    _, card, rows = trained
    ages = np.array([float(r["age"]) for r in rows])
    for r in rows:
        half = fold_halfwidth([float(r[f"sub_{s}"]) for s in SUBS])  # spread across sub-ensembles
        assert float(r["lower"]) == pytest.approx(float(r["mlens"]) - half, rel=1e-4, abs=2e-3)
        assert float(r["upper"]) == pytest.approx(float(r["mlens"]) + half, rel=1e-4, abs=2e-3)
    inside = [float(r["lower"]) <= a <= float(r["upper"]) for r, a in zip(rows, ages)]
    interval = card["metrics"]["cross_validation"]["interval"]
    assert interval["ensemble"]["coverage"] == pytest.approx(np.mean(inside), abs=1e-9)
    residuals = ages - np.array([float(r["mlens"]) for r in rows])
    assert card["ensemble"]["interval"]["calibrated_halfwidth"] == pytest.approx(
        conformal_halfwidth(residuals), abs=2e-3)
    assert 0 <= interval["calibrated"]["coverage"] <= 1


def test_prediction_of_a_new_scan_and_its_relevance(trained, data, tmp_path):
    root, card, _ = trained
    predictor = MLensPredictor.from_models_dir(root / "models")
    inputs = predictor.prepare(_mni(data[1], "s007"))
    result = predictor.predict_prepared(inputs)
    per_fold = np.array([[predictor.predict_prepared(inputs, folds=[k]).subensembles[s] for s in SUBS]
                         for k in range(3)])
    top = card["ensemble"]["top"]
    assert result.brain_age == pytest.approx(float(per_fold.mean(0) @ top["coef"] + top["intercept"]))
    half = np.mean([fold_halfwidth(per_fold[k]) for k in range(3)])
    assert (result.lower, result.upper) == pytest.approx((result.brain_age - half, result.brain_age + half))
    maps = predictor.relevance_maps(inputs, folds=[0])
    for s, (volume, evidence) in maps.items():
        assert volume.shape == inputs[s].shape and len(evidence) == 2
        assert float(volume.data.sum()) == pytest.approx(float(np.mean(evidence)), rel=1e-3, abs=1e-4)
    img = predictor.relevance_image(inputs, folds=[0])
    expected = sum(float(np.mean(e)) for _, e in maps.values())
    assert img.shape == (99, 117, 95)
    assert float(img.get_fdata().sum()) == pytest.approx(expected, rel=0.05, abs=1e-3)


def test_type_i_uses_the_base_model_spread(data, tmp_path):
    torch.set_num_threads(1)
    cfg = tmp_path / "mlens-i.toml"
    cfg.write_text(_config(*data, tmp_path, ensemble_type="i", folds=2, epochs=2))
    result = run_training(load_config(cfg))
    card = json.loads(open(result["card"]).read())
    assert [s["name"] for s in card["ensemble"]["subensembles"]] == ["T1w-whole"]
    with open(tmp_path / "models" / "mlens" / "cv_predictions.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for r in rows:
        half = fold_halfwidth([float(r[f"base_T1w-whole_{b:02d}"]) for b in range(2)])
        assert float(r["upper"]) - float(r["mlens"]) == pytest.approx(half, rel=1e-3, abs=2e-3)


def test_ridge_matches_scikit_learn():
    rng = np.random.default_rng(0)
    X = rng.normal(50, 10, (20, 4))
    y = X @ [0.3, 0.2, 0.1, 0.4] + rng.normal(0, 2, 20)
    for alpha in (0.0, 1.0, 30.0):
        coef, intercept = fit_ridge(X, y, alpha)
        reference = Ridge(alpha=alpha).fit(X, y)
        np.testing.assert_allclose(coef, reference.coef_, rtol=1e-8)
        assert intercept == pytest.approx(reference.intercept_, rel=1e-8)


def test_grouped_folds_keep_participants_together():
    groups = ["a", "a", "b", "c", "c", "d", "e", "f"]
    ages = [20, 21, 30, 40, 41, 50, 60, 70]
    folds = grouped_folds(groups, ages, 3, seed=0)
    assert folds[0] == folds[1] and folds[3] == folds[4] and set(folds) == {0, 1, 2}


@pytest.mark.parametrize("model, match", [
    ({"ensemble_type": "iii"}, "ensemble_type"),
    ({"sequences": ["T1w", "FLAIR"]}, "only \\['T1w'\\]"),
    ({"ensemble_type": "i", "regions": ["cortical"]}, "regions must be \\['whole'\\]"),
    ({"base_models": 1}, "base_models"),
    ({"growth_rate": 4}, "unknown key"),
    ({"interval": "bootstrap"}, "interval"),
    ({"activation": "tanh"}, "activation"),
])
def test_invalid_model_tables(model, match):
    with pytest.raises(UsageError, match=match):
        get_family("mlens", model, {"resolution_mm": 8.0})
    with pytest.raises(UsageError, match="region"):
        get_family("mlens", {}, {"region": "cortical"})


def test_missing_mni_input_names_the_file(tmp_path):
    bids, derivs = make_synthetic_dataset(tmp_path, [30.0, 50.0, 70.0, 40.0, 60.0, 25.0],
                                          shape=(12, 12, 12))
    config = config_from_dict({"family": "mlens", "work_dir": str(tmp_path / "w"),
                               "data": {"bids_dir": str(bids), "derivatives": [str(derivs)],
                                        "folds": 2, "val_fraction": 0.2},
                               "model": {"base_models": 2}, "input": {"resolution_mm": 8.0},
                               "runtime": {"device": "cpu", "progress": False},
                               "export": {"robustness_spacings_mm": []}})
    from bidsapp.errors import InputMissingError

    with pytest.raises(InputMissingError, match="space-MNI152NLin2009aSym_res-2_desc-preproc_T1w"):
        run_training(config)
