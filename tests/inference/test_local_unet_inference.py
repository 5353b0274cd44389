"""Inference with a local-unet card (seed 000): checked weights, tiled maps averaged over folds
and Monte-Carlo dropout samples, maps on the 2 mm grid, ROI table, the nipype interface and the
models workflow writing the brain-age row, the maps and the report figures."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bidsapp.atlases import load_harvard_oxford
from bidsapp.errors import ModelError
from bidsapp.inference.densenet_clinical import fold_interval
from bidsapp.inference.local_unet import (LocalUNetPredictor, network_from_card, roi_table,
                                          tiled_age_map)
from bidsapp.inference.weights import load_checked
from bidsapp.templates import get_template

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "training"))  # the shared tiny training configs
from training.config import load_config  # noqa: E402
from training.run import run_training  # noqa: E402
from training.synthetic import make_synthetic_dataset  # noqa: E402
from training_configs import engine_config_text  # noqa: E402

AGES = (22.0, 35.0, 48.0, 61.0, 74.0, 87.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A local-unet model trained for one epoch in two folds by the engine (8 mm, 30 -> 10)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("localunet")
    bids, derivs = make_synthetic_dataset(root / "data", AGES, shape=(12, 12, 12), modulated=True)
    cfg = root / "tiny.toml"
    cfg.write_text(engine_config_text(
        "local-unet", bids, derivs, root / "work", root / "models", seed=1, folds=2,
        val_fraction=0.2,
        model={"init_channels": 2, "depth": 2, "convs_per_scale": 1, "block_size": 30,
               "dropout": 0.2, "blocks_per_scan": 2, "val_blocks": 2, "standardize_input": True},
        inputs={"resolution_mm": 8.0}, optim={"lr": 1e-3, "batch_size": 2, "max_epochs": 1},
        export={"fp16": "never", "robustness_spacings_mm": [], "ridge_baseline": False}))
    run_training(load_config(cfg))
    anat = derivs / "sub-s004" / "anat"
    return root / "models", anat, AGES[4]


def test_prediction_is_the_mean_of_the_tiled_fold_maps(trained):
    models, anat, _ = trained
    predictor = LocalUNetPredictor.from_models_dir(models)
    assert predictor.mc_samples == 0 and (predictor.in_size, predictor.out_size) == (30, 10)
    prepared = predictor.prepare(predictor.input_paths(anat, "sub-s004"))
    result = predictor.predict_prepared(prepared)
    card = predictor.card
    manual = []
    for entry in card["weights"]:  # each fold network, rebuilt from the card, tiled by hand
        net, _ = network_from_card(card)
        net.load_state_dict(load_checked(models / "local-unet" / entry["file"], entry["sha256"]))
        manual.append(tiled_age_map(net.eval(), prepared.data, prepared.mask, 30, 10))
    manual = np.stack(manual)
    mask = prepared.mask
    np.testing.assert_allclose(result.age_map[mask], manual.mean(axis=0)[mask], rtol=1e-5)
    np.testing.assert_allclose(result.sd_map[mask], manual.std(axis=0, ddof=1)[mask], rtol=1e-4,
                               atol=1e-5)
    assert np.isnan(result.age_map[~mask]).all()
    assert result.brain_age == pytest.approx(float(manual.mean(axis=0)[mask].mean()), rel=1e-6)
    mean, lower, upper = fold_interval([m[mask].mean() for m in manual])
    assert (result.lower, result.upper) == pytest.approx((lower, upper), rel=1e-6)
    assert len(result.sample_global) == result.n_folds == 2


def test_monte_carlo_dropout_samples(trained):
    models, anat, _ = trained
    predictor = LocalUNetPredictor.from_models_dir(models, mc_samples=3)
    prepared = predictor.prepare(predictor.input_paths(anat, "sub-s004"))
    first = predictor.predict_prepared(prepared)
    again = predictor.predict_prepared(prepared)
    assert len(first.sample_global) == 2 * 3 and first.mc_samples == 3
    assert len(set(first.sample_global)) == 6  # dropout is active: every sample differs
    np.testing.assert_array_equal(first.age_map, again.age_map)  # seeded masks
    assert np.all(first.sd_map[prepared.mask] > 0)
    for net in predictor.networks:
        assert not net.training and all(not m.training for m in net.modules())
    card = json.loads((models / "local-unet" / "model_card.json").read_text())
    card["architecture"]["net_kwargs"]["dropout"] = 0.0
    with pytest.raises(ModelError, match="no dropout"):
        LocalUNetPredictor(card, models / "local-unet", mc_samples=2)


def test_tampered_weights_are_refused(trained, tmp_path):
    models, _, _ = trained
    folder = models / "local-unet"
    card = json.loads((folder / "model_card.json").read_text())
    target = tmp_path / card["weights"][0]["file"]
    data = bytearray((folder / card["weights"][0]["file"]).read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    (tmp_path / card["weights"][1]["file"]).write_bytes(
        (folder / card["weights"][1]["file"]).read_bytes())
    with pytest.raises(ModelError, match="sha256"):
        LocalUNetPredictor(card, tmp_path)
    card["family"] = "mlens"
    with pytest.raises(ModelError, match="not a local-unet"):
        LocalUNetPredictor(card, folder)


def test_maps_on_the_two_mm_grid_and_roi_table(trained):
    models, anat, age = trained
    predictor = LocalUNetPredictor.from_models_dir(models)
    result = predictor.predict(predictor.input_paths(anat, "sub-s004"))
    images = result.images(age)
    assert set(images) == {"brainagemap", "brainagesdmap", "brainpadmap"}
    tpl = get_template(2.0)
    inside = np.asarray(tpl.mask.dataobj) > 0
    for img in images.values():
        assert img.shape == (99, 117, 95) and np.allclose(img.affine, tpl.affine)
        assert np.isnan(np.asarray(img.dataobj)[~inside]).all()
    brain_age = np.asarray(images["brainagemap"].dataobj)
    pad = np.asarray(images["brainpadmap"].dataobj)
    np.testing.assert_allclose(pad[inside], brain_age[inside] - age, rtol=1e-6, equal_nan=True)
    assert np.isfinite(brain_age[inside]).mean() > 0.97
    assert set(result.images(None)) == {"brainagemap", "brainagesdmap"}
    table = roi_table(images["brainagemap"], age)
    labels, atlas = load_harvard_oxford(images["brainagemap"])
    labels = np.asarray(labels.dataobj)
    hippocampus = int(atlas.loc[atlas["name"] == "Left_Hippocampus", "index"].iloc[0])
    row = table.set_index("name").loc["Left_Hippocampus"]
    values = brain_age[(labels == hippocampus) & np.isfinite(brain_age)]
    assert row["brain_age"] == pytest.approx(values.mean(), rel=1e-6)
    assert row["n_voxels"] == values.size
    np.testing.assert_allclose(table["brain_pad"], table["brain_age"] - age)
    assert len(table) > 60 and set(table["atlas"]) == {"cortical", "subcortical"}


def test_workflow_writes_row_maps_roi_table_and_report_figures(trained, tmp_path):
    from model_workflows import run_models_into_sink

    from bidsapp.derivatives import write_bidsignore
    from bidsapp.group import _MAP_RE
    from bidsapp.reports import generate_participant_report
    from bidsapp.workflows.models import MODEL_INPUT_FIELDS, init_models_wf

    models, anat, age = trained
    assert {"std_mod_tpms_res2", "std_mod_tpms_res1p5"} <= set(MODEL_INPUT_FIELDS)
    maps = sorted(str(p) for p in anat.glob("*res-2_label-*_desc-modulated_probseg.nii.gz"))
    assert [Path(p).name.split("_label-")[1][:2] for p in maps] == ["GM", "WM"]
    models_wf = init_models_wf(models=["local-unet"], age=age)
    node = models_wf.get_node("local_unet")
    node.inputs.models_dir = str(models)
    assert node.inputs.age == age
    models_wf.inputs.inputnode.std_mod_tpms_res2 = maps
    out_anat = run_models_into_sink(models_wf, tmp_path, "s004", age)
    out = out_anat.parents[1]
    expected = LocalUNetPredictor.from_models_dir(models).predict(maps)
    table = (out_anat / "sub-s004_brainage.tsv").read_text().splitlines()
    row = dict(zip(table[0].split("\t"), table[1].split("\t")))
    assert len(table) == 2 and row["model"] == "local-unet"
    assert float(row["brain_age"]) == pytest.approx(expected.brain_age, abs=1e-3)
    assert float(row["brain_age_lower"]) == pytest.approx(expected.lower, abs=1e-3)
    assert float(row["brain_pad"]) == pytest.approx(expected.brain_age - age, abs=1e-3)
    prefix = "sub-s004_space-MNI152NLin2009aSym_res-2_desc-localunet_"
    for suffix in ("brainagemap", "brainagesdmap", "brainpadmap"):
        path = out_anat / f"{prefix}{suffix}.nii.gz"
        assert nib.load(path).shape == (99, 117, 95)
        sidecar = json.loads((out_anat / f"{prefix}{suffix}.json").read_text())
        assert sidecar["Model"] == "local-unet" and sidecar["Units"] == "year"
    # the group level finds the brain-age map under this model's name (and only that map)
    found = [m for m in (_MAP_RE.search(p.name) for p in out_anat.iterdir()) if m]
    assert [(m["model"], m["kind"]) for m in found] == [("localunet", "brainagemap")]
    written = np.asarray(nib.load(out_anat / f"{prefix}brainagemap.nii.gz").dataobj)
    np.testing.assert_allclose(written, np.asarray(expected.images()["brainagemap"].dataobj),
                               rtol=1e-5)
    rois = (out_anat / f"{prefix}brainageroi.tsv").read_text().splitlines()
    header = rois[0].split("\t")
    assert header == ["index", "name", "hemisphere", "atlas", "n_voxels", "brain_age", "brain_pad"]
    first = dict(zip(header, rois[1].split("\t")))
    assert float(first["brain_pad"]) == pytest.approx(float(first["brain_age"]) - age, abs=2e-4)
    dictionary = json.loads((out_anat / f"{prefix}brainageroi.json").read_text())
    assert dictionary["brain_pad"]["Units"] == "year" and dictionary["Model"] == "local-unet"
    ignore = write_bidsignore(out).read_text().split()
    assert {"*_brainpadmap.*", "*_brainagesdmap.*", "*_brainageroi.*"} <= set(ignore)
    report = generate_participant_report(out, "sub-s004", run_uuid="test")
    figures = set(re.findall(r'src="sub-s004/figures/([^"]+)\.svg"', report.read_text()))
    assert {f"{prefix}brainagemap", f"{prefix}brainpadmap"} <= figures
    assert "locally older-appearing" in report.read_text()
