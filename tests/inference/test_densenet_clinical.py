"""Inference with a densenet-clinical card: checked weights, ensemble, interval, relevance maps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from bidsapp.errors import ModelError
from bidsapp.explain import guided_backprop, map_to_grid, warp_to_template
from bidsapp.inference.densenet_clinical import (DenseNetClinicalPredictor, fold_interval,
                                                 predict_densenet_clinical)
from bidsapp.inference.weights import load_checked, sha256_file
from bidsapp.nets import DenseNetRegressor
from bidsapp.transforms import (ClinicalInputSpec, SimulateThickSlices, load_skull_stripped,
                                prepare_views)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from training.synthetic import make_synthetic_dataset  # noqa: E402

ARCH = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "init_features": 4,
        "growth_rate": 4, "block_config": [2, 2]}
SPEC = ClinicalInputSpec(spacing_mm=4.0, shape=(14, 16, 10))


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    _, derivs = make_synthetic_dataset(tmp_path_factory.mktemp("scans"), [30.0, 70.0],
                                       shape=(28, 32, 28))
    anat = derivs / "sub-s001" / "anat"
    return anat / "sub-s001_desc-preproc_T1w.nii.gz", anat / "sub-s001_desc-brain_mask.nii.gz"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder: ``densenet-clinical/model_card.json`` with three differently initialised
    fold networks next to it (one stored as float16)."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "densenet-clinical").mkdir()
    weights = []
    for k in range(3):
        torch.manual_seed(k)
        net = DenseNetRegressor(**{**ARCH, "block_config": tuple(ARCH["block_config"])})
        net.set_target_scaling(50.0 + k, 15.0)
        state = net.state_dict()
        if k == 2:
            state = {n: (v.half() if v.is_floating_point() and "target" not in n else v)
                     for n, v in state.items()}
        path = folder / "densenet-clinical" / f"fold{k}.pt"
        torch.save(state, path)
        weights.append({"fold": k, "file": f"fold{k}.pt", "sha256": sha256_file(path)})
    card = {"id": "densenet-clinical", "family": "densenet-clinical",
            "architecture": {"params": ARCH}, "input": {"params": SPEC.to_dict()},
            "weights": weights}
    (folder / "densenet-clinical" / "model_card.json").write_text(json.dumps(card))
    return folder


def _manual_predictions(models, t1w, mask):
    card = json.loads((models / "densenet-clinical" / "model_card.json").read_text())
    views = prepare_views(load_skull_stripped(t1w, mask), SPEC)
    x = torch.from_numpy(np.stack([v.data for v in views]))[:, None]
    out = []
    for entry in card["weights"]:
        state = {k: (v.float() if v.dtype == torch.float16 else v)
                 for k, v in torch.load(models / "densenet-clinical" / entry["file"],
                                        weights_only=True).items()}
        net = DenseNetRegressor(**{**ARCH, "block_config": (2, 2)})
        net.load_state_dict(state)
        with torch.no_grad():
            out.append(float(net.eval()(x).mean()))
    return out


def test_ensemble_prediction_and_interval(models, scans):
    result = predict_densenet_clinical(*scans, models_dir=models)
    manual = _manual_predictions(models, *scans)
    np.testing.assert_allclose(result.fold_predictions, manual, rtol=1e-5)
    assert result.brain_age == pytest.approx(np.mean(manual))
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * np.std(manual, ddof=1) * np.sqrt(1 + 1 / 3)
    assert result.lower == pytest.approx(np.mean(manual) - half)
    assert result.upper == pytest.approx(np.mean(manual) + half)
    assert result.n_views == 4 and not result.thick_slice


def test_fold_interval_edge_cases():
    mean, lo, hi = fold_interval([41.0])
    assert mean == 41.0 and np.isnan(lo) and np.isnan(hi)
    with pytest.raises(ValueError, match="level"):
        fold_interval([1.0, 2.0], level=1.5)


def test_thick_slice_scan_is_not_resliced(models, scans, tmp_path):
    volume = SimulateThickSlices(6.0)(load_skull_stripped(*scans))
    t1w, mask = tmp_path / "thick_T1w.nii.gz", tmp_path / "thick_mask.nii.gz"
    volume.to_nifti().to_filename(t1w)
    nib.Nifti1Image((volume.data > 0).astype(np.uint8), volume.affine).to_filename(mask)
    result = DenseNetClinicalPredictor.from_models_dir(models).predict(t1w, mask)
    assert result.n_views == 1 and result.thick_slice


def test_registry_finds_the_card(models, monkeypatch):
    from bidsapp.inference.registry import available_models, resolve_models

    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(models))
    assert "densenet-clinical" in available_models()
    assert resolve_models(["densenet-clinical"]) == ["densenet-clinical"]
    assert len(DenseNetClinicalPredictor.from_models_dir().networks) == 3


def test_earlier_layout_predicts_the_same(models, scans, tmp_path, caplog):
    """A card of earlier versions (``<id>.json`` beside ``<id>/``, paths relative to the models
    folder) still loads, with a deprecation warning logged once, and predicts the same."""
    import logging
    import shutil

    legacy = tmp_path / "old-models"
    shutil.copytree(models / "densenet-clinical", legacy / "densenet-clinical")
    card = json.loads((legacy / "densenet-clinical" / "model_card.json").read_text())
    (legacy / "densenet-clinical" / "model_card.json").unlink()
    card["weights"] = [{**w, "file": f"densenet-clinical/{w['file']}"} for w in card["weights"]]
    (legacy / "densenet-clinical.json").write_text(json.dumps(card))
    with caplog.at_level(logging.WARNING, logger="brainage.inference"):
        old = predict_densenet_clinical(*scans, models_dir=legacy)
        DenseNetClinicalPredictor.from_models_dir(legacy)
    new = predict_densenet_clinical(*scans, models_dir=models)
    assert old.fold_predictions == pytest.approx(new.fold_predictions, rel=1e-6)
    warnings = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and "model_card.json" in warnings[0].getMessage()


def test_tampered_or_unsafe_weights_are_refused(models, tmp_path):
    entry = json.loads((models / "densenet-clinical" / "model_card.json").read_text())["weights"][0]
    path = models / "densenet-clinical" / entry["file"]
    bad = tmp_path / "fold0.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="fold0.pt.*sha256"):
        load_checked(bad, entry["sha256"])
    with pytest.raises(ModelError, match="missing"):
        load_checked(tmp_path / "absent.pt", entry["sha256"])
    pickled = tmp_path / "evil.pt"
    torch.save({"x": Path("/etc")}, pickled)  # not a plain tensor container
    with pytest.raises(ModelError, match="evil.pt.*cannot be loaded safely"):
        load_checked(pickled, sha256_file(pickled))
    assert torch.equal(load_checked(path, entry["sha256"])["target_scale"], torch.tensor(15.0))


def test_guided_backprop_known_answer():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("flatten", nn.Flatten())
    net.add_module("fc1", nn.Linear(24, 6))
    net.add_module("relu", nn.LeakyReLU(0.01))
    net.add_module("fc2", nn.Linear(6, 1))
    x = torch.randn(2, 3, 4)
    grad = guided_backprop(net, x[None])
    w1, b1, w2 = net.fc1.weight.detach(), net.fc1.bias.detach(), net.fc2.weight.detach()[0]
    active = (w1 @ x.reshape(-1) + b1) > 0
    # guided ReLU: pass the gradient only where the unit fired and the gradient is positive
    expected = (w1.T @ (w2 * active * (w2 > 0))).reshape(2, 3, 4)
    np.testing.assert_allclose(grad, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert isinstance(net.relu, nn.LeakyReLU)  # restored afterwards


def test_map_to_grid_is_exact_for_linear_maps():
    coarse_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    coarse_affine[:3, 3] = (-20, -24, -16)
    ijk = np.indices((11, 13, 9)).reshape(3, -1)
    world = coarse_affine[:3, :3] @ ijk + coarse_affine[:3, 3:4]
    values = (np.array([1.0, 2.0, -0.5]) @ world).reshape(11, 13, 9)
    fine_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine_affine[:3, 3] = (-10, -12, -8)
    out = map_to_grid(values, coarse_affine, (10, 12, 8), fine_affine)
    fijk = np.indices((10, 12, 8)).reshape(3, -1)
    fworld = fine_affine[:3, :3] @ fijk + fine_affine[:3, 3:4]
    np.testing.assert_allclose(out.ravel(), np.array([1.0, 2.0, -0.5]) @ fworld, atol=1e-4)


def test_relevance_map_in_the_t1w_grid(models, scans, tmp_path):
    t1w, mask = scans
    # store the T1w with a flipped first axis: the map must come back in that voxel order
    img = nib.load(t1w)
    flipped = img.as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))
    fmask = nib.load(mask).as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))
    flipped.to_filename(tmp_path / "las_T1w.nii.gz")
    fmask.to_filename(tmp_path / "las_mask.nii.gz")
    out = tmp_path / "relevance.nii.gz"
    predict_densenet_clinical(tmp_path / "las_T1w.nii.gz", tmp_path / "las_mask.nii.gz",
                              models_dir=models, relevance_file=out)
    rel = nib.load(out)
    assert rel.shape == flipped.shape
    np.testing.assert_allclose(rel.affine, flipped.affine, atol=1e-5)
    data, brain = rel.get_fdata(), np.asanyarray(fmask.dataobj) > 0
    assert data.min() >= 0 and np.all(data[~brain] == 0) and data[brain].max() > 0


def test_relevance_map_is_the_mean_over_networks_and_views(models, scans):
    # the predictor sums per view grid before resampling; that must equal resampling every
    # network's map of every view on its own and averaging (interpolation is linear)
    t1w, mask = scans
    predictor = DenseNetClinicalPredictor.from_models_dir(models)
    volume, views = predictor.prepare(t1w, mask)
    direct = np.zeros(volume.shape, np.float32)
    for net in predictor.networks:
        for view in views:
            grad = np.abs(guided_backprop(net, view.data))
            direct += map_to_grid(grad, view.affine, volume.shape, volume.affine)
    direct /= len(predictor.networks) * len(views)
    direct[volume.data == 0] = 0
    got = predictor.relevance_map(volume, views).data
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-6 * float(direct.max()))
    assert len(views) > 1 and len(predictor.networks) > 1


def test_warp_to_template_applies_the_ants_transform(tmp_path):
    ants = pytest.importorskip("ants")
    data = np.zeros((20, 20, 20), np.float32)
    data[8:12, 8:12, 8:12] = 1.0
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "map.nii.gz")
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    tx.set_parameters([1, 0, 0, 0, 1, 0, 0, 0, 1, 3.0, 0, 0])  # sample 3 mm further along x
    ants.write_transform(tx, str(tmp_path / "xfm.mat"))
    out = warp_to_template(tmp_path / "map.nii.gz", tmp_path / "xfm.mat", tmp_path / "map.nii.gz",
                           tmp_path / "warped.nii.gz")
    warped = nib.load(out).get_fdata()
    assert warped.sum() == pytest.approx(data.sum(), rel=1e-3)
    com = np.array(np.nonzero(warped > 0.5)).mean(axis=1)
    original = np.array(np.nonzero(data > 0.5)).mean(axis=1)
    # ITK physical space is LPS: +3 mm in x moves the content by 3 voxels along the first axis
    assert abs(abs(com[0] - original[0]) - 3) < 1e-6 and np.allclose(com[1:], original[1:])


def test_nipype_interface_returns_numbers_and_maps(models, scans, tmp_path):
    from bidsapp.interfaces.models import DenseNetClinicalPredict

    t1w, mask = scans
    node = DenseNetClinicalPredict(t1w_preproc=str(t1w), t1w_mask=str(mask), models_dir=str(models))
    result = node.run(cwd=str(tmp_path))
    outputs = result.outputs
    expected = predict_densenet_clinical(t1w, mask, models_dir=models)
    assert outputs.brain_age == pytest.approx(expected.brain_age)
    assert outputs.brain_age_lower == pytest.approx(expected.lower)
    assert outputs.brain_age_upper == pytest.approx(expected.upper)
    assert outputs.n_views == 4
    assert Path(outputs.relevance_map).parent == tmp_path
    assert nib.load(outputs.relevance_map).shape == nib.load(t1w).shape
    record = json.loads(Path(outputs.prediction).read_text())
    assert record["model"] == "densenet-clinical"
    assert record["brain_age"] == pytest.approx(expected.brain_age)
    assert record["details"]["fold_predictions"] == pytest.approx(list(expected.fold_predictions))
    assert [m["file"] for m in record["maps"]] == [outputs.relevance_map]  # no transform given


def test_models_workflow_writes_the_brainage_table(models, scans, tmp_path):
    """Model node -> merge -> sink, as inside the participant workflow (no preprocessing)."""
    from model_workflows import run_models_into_sink

    from bidsapp.workflows.models import init_models_wf

    t1w, mask = scans
    models_wf = init_models_wf(models=["densenet-clinical", "ensemble"])
    models_wf.get_node("densenet_clinical").inputs.models_dir = str(models)
    models_wf.inputs.inputnode.t1w_preproc = str(t1w)
    models_wf.inputs.inputnode.t1w_mask = str(mask)
    anat = run_models_into_sink(models_wf, tmp_path, "s001", 30.0, raw_t1w=t1w)
    table = (anat / "sub-s001_brainage.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["model", "brain_age", "brain_age_lower", "brain_age_upper",
                                     "age", "brain_pad"]
    assert len(table) == 2  # one model: no ensemble row
    row = dict(zip(table[0].split("\t"), table[1].split("\t")))
    expected = predict_densenet_clinical(t1w, mask, models_dir=models)
    assert row["model"] == "densenet-clinical"
    assert float(row["brain_age"]) == pytest.approx(expected.brain_age, abs=1e-4)
    assert float(row["brain_age_lower"]) == pytest.approx(expected.lower, abs=1e-4)
    assert float(row["brain_pad"]) == pytest.approx(expected.brain_age - 30.0, abs=1e-4)
    relevance = anat / "sub-s001_desc-densenetclinical_relevancemap.nii.gz"
    assert nib.load(relevance).shape == nib.load(t1w).shape
    sidecar = json.loads((anat / "sub-s001_desc-densenetclinical_relevancemap.json").read_text())
    assert sidecar["Model"] == "densenet-clinical"
    assert sidecar["Sources"] == ["bids:raw:sub-s001/anat/sub-s001_T1w.nii.gz"]


def test_shipped_card_is_consistent():
    card_path = REPO / "models" / "densenet-clinical" / "model_card.json"
    if not card_path.is_file():
        pytest.skip("no densenet-clinical model shipped in this checkout")
    predictor = DenseNetClinicalPredictor.from_models_dir(REPO / "models")
    card = predictor.card
    assert len(predictor.networks) == len(card["weights"]) == card["split"]["folds"]
    for entry in card["weights"]:
        assert (card_path.parent / entry["file"]).stat().st_size <= 50 * 2 ** 20
    pooled = card["metrics"]["cross_validation"]["pooled"]
    assert pooled["n"] == card["training_data"]["n_scans"]
