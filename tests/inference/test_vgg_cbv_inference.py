"""Inference with a vgg-cbv card exported by the training engine: checked weights, fold
ensemble, the stacks (T, TS; TA, TAS with a CBV branch), the interval, the top-20 % Grad-CAM map,
and the models workflow writing the row, the map and the branch/stack provenance."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nipype.interfaces.base import isdefined
from scipy import stats

from bidsapp.errors import ModelError
from bidsapp.explain import map_to_grid
from bidsapp.explain.gradcam import VGGGradCAM
from bidsapp.inference.registry import read_card
from bidsapp.inference.vgg_cbv import (VGGCBVPredictor, check_cbv_request, predict_vgg_cbv,
                                       synthesise_cbv_image)
from bidsapp.nets import VGG8
from bidsapp.templates import get_template
from bidsapp.transforms.mni_affine import MNIAffineSpec, prepare_vgg_input
from model_workflows import tampered_copy
from vgg_cbv_models import add_cbv_branch, mni_t1w, write_cbv_checkpoint


@pytest.fixture(scope="module")
def exported(tiny_vgg_cbv):
    models, derivs = tiny_vgg_cbv
    return models, mni_t1w(derivs)


@pytest.fixture(scope="module")
def with_cbv(exported, tmp_path_factory):
    """The exported model with a CBV branch, a CBV synthesis checkpoint and the map it makes."""
    models, scan = exported
    root = tmp_path_factory.mktemp("cbv")
    card = add_cbv_branch(models, root / "models")
    checkpoint = write_cbv_checkpoint(root / "cbv_synth.pt")
    return root / "models", card, checkpoint, synthesise_cbv_image(scan, checkpoint)


def _fold_predictions(models: Path, image, branch: str = "t1w") -> list[float]:
    """Each fold network's prediction, computed by hand from the card and its weight files."""
    card, folder = read_card("vgg-cbv", models)
    x = prepare_vgg_input(image, MNIAffineSpec.from_dict(card["input"]["params"])).data
    out = []
    for entry in sorted(card["weights"], key=lambda w: w["fold"]):
        if entry.get("branch", "t1w") != branch:
            continue
        net = VGG8(**card["architecture"]["net_kwargs"])
        net.load_state_dict(torch.load(folder / entry["file"], weights_only=True))
        with torch.no_grad():
            out.append(float(net.eval()(torch.from_numpy(x)[None, None])[0, 0]))
    return out


def _interval(values):
    values = np.asarray(values)
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) * math.sqrt(1 + 1 / values.size)
    return values.mean() - half, values.mean() + half


def test_prediction_is_the_ts_stack_of_the_fold_networks(exported):
    models, scan = exported
    card, _ = read_card("vgg-cbv", models)
    folds = _fold_predictions(models, scan)
    c0, c1, c2 = card["stacking"]["stacks"]["TS"]["coef"]
    predictor = VGGCBVPredictor.from_models_dir(models)
    for sex, code in (("M", 1), ("female", 0)):
        result = predictor.predict(scan, sex=sex)
        expected = [c0 + c1 * f + c2 * code for f in folds]
        assert (result.stack, result.branches, result.sex_code) == ("TS", ("t1w",), code)
        np.testing.assert_allclose(result.branch_predictions["t1w"], folds, rtol=1e-5)
        assert result.brain_age == pytest.approx(np.mean(expected), rel=1e-5)
        assert (result.lower, result.upper) == pytest.approx(_interval(expected), rel=1e-5)
        assert result.provenance() == {
            "Branches": "T1w", "Stack": "TS", "StackPredictors": ["t1w", "sex"],
            "StackCoefficients": [c0, c1, c2], "SexCode": code, "CBVSource": None, "Notes": []}


@pytest.mark.parametrize("sex, said", [(None, "sex missing"), ("other", "'other' is not one of F/M")])
def test_unknown_sex_falls_back_to_the_t_stack_with_a_note(exported, caplog, sex, said):
    models, scan = exported
    card, _ = read_card("vgg-cbv", models)
    c0, c1 = card["stacking"]["stacks"]["T"]["coef"]
    folds = _fold_predictions(models, scan)
    with caplog.at_level(logging.INFO, logger="brainage.inference"):
        result = predict_vgg_cbv(scan, sex=sex, models_dir=models)
    assert result.stack == "T" and result.sex_code is None
    assert result.brain_age == pytest.approx(c0 + c1 * np.mean(folds), rel=1e-5)
    assert (result.lower, result.upper) == pytest.approx(_interval([c0 + c1 * f for f in folds]),
                                                         rel=1e-5)
    (note,) = result.notes
    assert said in note and "stack T applied without the sex term" in note
    assert note in caplog.text
    assert result.provenance()["Stack"] == "T" and result.provenance()["Notes"] == [note]


def test_card_without_stack_coefficients_gives_the_plain_fold_mean(exported):
    models, scan = exported
    card, folder = read_card("vgg-cbv", models)
    for stack in card["stacking"]["stacks"].values():  # a card exported by an earlier version
        del stack["coef"]
    result = VGGCBVPredictor(card, folder).predict(scan, sex="M")
    folds = _fold_predictions(models, scan)
    assert result.stack == "none" and result.coef == ()
    assert result.brain_age == pytest.approx(np.mean(folds), rel=1e-5)
    assert "no stack coefficients" in result.notes[0]


def test_tampered_or_inconsistent_cards_are_refused(exported, tmp_path):
    models, _ = exported
    with pytest.raises(ModelError, match="fail the sha256 check"):
        VGGCBVPredictor.from_models_dir(tampered_copy(models, tmp_path / "models", "vgg-cbv"))
    card, folder = read_card("vgg-cbv", models)
    with pytest.raises(ModelError, match="not a vgg-cbv model"):
        VGGCBVPredictor({**card, "family": "mlens"}, folder)
    bad = json.loads(json.dumps(card))
    bad["stacking"]["stacks"]["TS"]["coef"] = [1.0, 2.0]
    with pytest.raises(ModelError, match="stack TS needs one coefficient per column"):
        VGGCBVPredictor(bad, folder)
    bad = json.loads(json.dumps(card))
    bad["weights"][0]["branch"] = "flair"
    with pytest.raises(ModelError, match=r"unknown branch\(es\) \['flair'\]"):
        VGGCBVPredictor(bad, folder)
    bad = json.loads(json.dumps(card))
    bad["weights"].append({**bad["weights"][0], "branch": "cbv"})
    with pytest.raises(ModelError, match="the CBV branch has folds"):
        VGGCBVPredictor(bad, folder)
    with pytest.raises(ModelError, match="no vgg-cbv model card"):
        VGGCBVPredictor.from_models_dir(tmp_path / "nowhere")


def test_synthesised_cbv_map_is_on_the_template_grid_inside_the_brain(exported, with_cbv):
    _, scan = exported
    cbv = with_cbv[3]
    grid = get_template(2.0)
    assert cbv.shape == grid.shape
    np.testing.assert_allclose(cbv.affine, grid.affine)
    data, brain = cbv.get_fdata(), nib.load(scan).get_fdata() > 0
    assert np.all(data[~brain] == 0) and np.count_nonzero(data[brain]) > 0.9 * brain.sum()


def test_cbv_branch_applies_the_ta_and_tas_stacks(exported, with_cbv):
    _, scan = exported
    models, card, checkpoint, cbv = with_cbv
    predictor = VGGCBVPredictor.from_models_dir(models)
    assert predictor.branches == ("t1w", "cbv")
    t1w, cbv_folds = _fold_predictions(models, scan), _fold_predictions(models, cbv, "cbv")
    assert not np.allclose(t1w, cbv_folds)  # same weights, other input
    for sex, stack, expected in (
            ("M", "TAS", [1.5 + 0.6 * t + 0.3 * a - 0.5 for t, a in zip(t1w, cbv_folds)]),
            (None, "TA", [2.0 + 0.6 * t + 0.3 * a for t, a in zip(t1w, cbv_folds)])):
        result = predictor.predict(scan, sex=sex, cbv=cbv, cbv_source="test map")
        assert result.stack == stack and result.branches == ("t1w", "cbv")
        assert result.brain_age == pytest.approx(np.mean(expected), rel=1e-5)
        assert (result.lower, result.upper) == pytest.approx(_interval(expected), rel=1e-5)
        provenance = result.provenance()
        assert provenance["Branches"] == "T1w+CBV" and provenance["Stack"] == stack
        assert provenance["CBVSource"] == "test map"
    # without a CBV map the same card falls back to the T1w stacks, and says why
    result = predictor.predict(scan, sex="M")
    assert result.stack == "TS" and result.branches == ("t1w",)
    assert any("no CBV map" in note for note in result.notes)
    # the up-front check accepts this card and checkpoint; a T1w-only card is refused
    check_cbv_request(card, checkpoint, models)
    t1w_card, _ = read_card("vgg-cbv", exported[0])
    with pytest.raises(ModelError, match="T1w-branch weights only"):
        check_cbv_request(t1w_card, checkpoint, exported[0])
    with pytest.raises(ModelError, match="no vgg-cbv model is installed"):
        check_cbv_request(None, checkpoint, exported[0])
    with pytest.raises(ModelError, match="not a CBV synthesis checkpoint"):
        check_cbv_request(card, next(Path(models).rglob("*.pt")), models)
    with pytest.raises(ModelError, match="cannot use a CBV map"):
        VGGCBVPredictor.from_models_dir(exported[0]).predict(scan, cbv=cbv)


def test_gradcam_map_keeps_the_top_fifth_of_the_fold_mean_on_the_template_grid(exported):
    models, scan = exported
    predictor = VGGCBVPredictor.from_models_dir(models)
    volume = predictor.prepare(scan)["t1w"]
    img = predictor.gradcam_image(volume, scan)
    grid = get_template(2.0)
    assert img.shape == grid.shape == nib.load(scan).shape
    np.testing.assert_allclose(img.affine, grid.affine)
    # by hand: each fold network's Grad-CAM (last conv block), mean, onto the 2 mm grid
    cams = [VGGGradCAM(net, "features.block4.conv")(volume.data[None, None])[0]
            for net in predictor.networks["t1w"]]
    cam = map_to_grid(np.mean(cams, axis=0), volume.affine, grid.shape, grid.affine)
    brain = nib.load(scan).get_fdata() > 0
    data = img.get_fdata()
    kept, k = data > 0, math.ceil(0.2 * brain.sum())
    assert np.count_nonzero(cam[brain] > 0) > k  # enough positive voxels for a full fifth
    threshold = np.sort(cam[brain])[::-1][k - 1]
    np.testing.assert_array_equal(kept, brain & (cam >= threshold))
    assert kept.sum() == k  # exactly the top 20 % of the brain (no ties at the threshold)
    np.testing.assert_allclose(data[kept], cam[kept], rtol=1e-5)


def _run_models_wf(tmp_path, models, scan, **kwargs):
    from model_workflows import run_models_into_sink

    from bidsapp.workflows.models import init_models_wf

    models_wf = init_models_wf(models=["vgg-cbv"], **kwargs)
    models_wf.get_node("vgg_cbv").inputs.models_dir = str(models)
    models_wf.inputs.inputnode.std_t1w = str(scan)
    anat = run_models_into_sink(models_wf, tmp_path, "s003", 40.0, raw_t1w=scan)
    lines = (anat / "sub-s003_brainage.tsv").read_text().splitlines()
    return anat, dict(zip(lines[0].split("\t"), lines[1].split("\t"))), \
        json.loads((anat / "sub-s003_brainage.json").read_text())


def test_models_workflow_writes_the_row_the_gradcam_map_and_the_provenance(exported, tmp_path):
    models, scan = exported
    anat, row, sidecar = _run_models_wf(tmp_path, models, scan, sex="F")
    expected = predict_vgg_cbv(scan, sex="F", models_dir=models)
    assert row["model"] == "vgg-cbv"
    for column, value in (("brain_age", expected.brain_age), ("brain_age_lower", expected.lower),
                          ("brain_age_upper", expected.upper),
                          ("brain_pad", expected.brain_age - 40.0)):
        assert float(row[column]) == pytest.approx(value, abs=1e-3)
    assert sidecar["ModelProvenance"] == {"vgg-cbv": expected.provenance()}
    assert sidecar["ModelProvenance"]["vgg-cbv"]["Branches"] == "T1w"
    assert sidecar["ModelProvenance"]["vgg-cbv"]["Stack"] == "TS"
    assert sidecar["brain_age"]["Units"] == "year"  # still the data dictionary
    gradcam = anat / "sub-s003_space-MNI152NLin2009aSym_res-2_desc-vggcbv_relevancemap.nii.gz"
    meta = json.loads(gradcam.with_name(gradcam.name.replace(".nii.gz", ".json")).read_text())
    assert meta["Model"] == "vgg-cbv" and meta["Method"] == "Grad-CAM" and meta["TopFraction"] == 0.2
    assert "top 20%" in meta["Description"] and meta["Layer"] == "features.block4.conv"
    img = nib.load(gradcam)
    predictor = VGGCBVPredictor.from_models_dir(models)
    direct = predictor.gradcam_image(predictor.prepare(scan)["t1w"], scan)
    np.testing.assert_allclose(img.get_fdata(), direct.get_fdata(), rtol=1e-5, atol=1e-7)


def test_models_workflow_with_a_cbv_model_records_both_branches(exported, with_cbv, tmp_path):
    _, scan = exported
    models, _, checkpoint, cbv = with_cbv
    _, row, sidecar = _run_models_wf(tmp_path, models, scan, cbv_model=checkpoint)
    provenance = sidecar["ModelProvenance"]["vgg-cbv"]
    assert provenance["Branches"] == "T1w+CBV" and provenance["Stack"] == "TA"
    assert provenance["CBVSource"].startswith("synthesised from the T1w by cbv_synth.pt (sha256 ")
    # the node synthesised the same map as the fixture did from the same checkpoint
    expected = VGGCBVPredictor.from_models_dir(models).predict(scan, cbv=cbv)
    assert float(row["brain_age"]) == pytest.approx(expected.brain_age, abs=1e-3)


def test_participant_workflow_gives_the_node_the_sex_and_the_cbv_model(tiny_bids, tmp_path):
    from bidsapp.bids.layout import collect_t1w_units
    from bidsapp.workflows.base import init_single_t1w_wf

    (unit,) = collect_t1w_units(tiny_bids, participant_labels=["01"])
    checkpoint = write_cbv_checkpoint(tmp_path / "cbv_synth.pt")
    workflow = init_single_t1w_wf(unit=unit, output_dir=tmp_path / "out",
                                  models=["vgg-cbv", "ensemble"], cbv_model=checkpoint)
    node = workflow.get_node("models_wf.vgg_cbv")
    assert (node.inputs.sex, node.inputs.cbv_model) == ("F", str(checkpoint))
    plain = init_single_t1w_wf(unit=unit, output_dir=tmp_path / "out", models=["vgg-cbv"])
    assert not isdefined(plain.get_node("models_wf.vgg_cbv").inputs.cbv_model)
