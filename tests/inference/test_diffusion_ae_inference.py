"""Inference with a diffusion-ae card exported by the training engine (seed 001): checked
weights, the fold mean, the Monte-Carlo dropout interval of the age MLP, the DDIM
reconstruction of the medial slice with its SSIM and PSNR, and the models workflow writing the
row, the slices with their sidecars and the report section."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nipype.interfaces.base import isdefined

from bidsapp.errors import ModelError, UsageError
from bidsapp.inference.diffusion_ae import (SLICE_SUFFIXES, DiffusionAEPredictor, _fold_seed,
                                            _mc_passes, check_ddim_request,
                                            predict_diffusion_ae)
from bidsapp.inference.registry import read_card
from bidsapp.nets import DiffusionAE, ddim_reconstruct, mc_dropout_age
from bidsapp.transforms.mni_slice import MNISliceSpec, prepare_slice_views, view_affine
from diffusion_ae_models import DDIM_STEPS, MC_SAMPLES, mni_t1w
from model_workflows import tampered_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tiny_diffusion_ae):
    models, derivs = tiny_diffusion_ae
    return models, mni_t1w(derivs)


@pytest.fixture(scope="module")
def predictor(exported):
    return DiffusionAEPredictor.from_models_dir(exported[0])


@pytest.fixture(scope="module")
def result(exported, predictor):
    return predictor.predict(exported[1], seed=7)


def _nets_by_hand(models: Path):
    """The card's spec and fold networks, built from its weight files without the predictor."""
    card, folder = read_card("diffusion-ae", models)
    spec = MNISliceSpec.from_dict(card["input"]["params"])
    nets = []
    for entry in sorted(card["weights"], key=lambda w: w["fold"]):
        net = DiffusionAE(**card["architecture"]["net_kwargs"])
        net.load_state_dict(torch.load(folder / entry["file"], weights_only=True))
        nets.append((entry["fold"], net.eval()))
    return card, spec, nets


def _medial_only(models: Path) -> DiffusionAEPredictor:
    """The exported model with a card in the layout before ``prediction.views`` (medial only)."""
    card, folder = read_card("diffusion-ae", models)
    del card["prediction"]["views"]
    return DiffusionAEPredictor(card, folder)


def test_brain_age_is_the_mean_of_the_fold_networks_over_the_views(exported, result):
    models, scan = exported
    card, spec, nets = _nets_by_hand(models)
    assert card["prediction"]["mc_dropout_samples"] == MC_SAMPLES
    assert card["prediction"]["views"] == "all" and spec.neighbour_slices == 1
    views = prepare_slice_views(scan, spec)
    assert len(views) == 3
    x = torch.from_numpy(np.stack(views))[:, None]
    with torch.no_grad():  # eval mode: each fold network's mean over the medial slice and its
        folds = [float(net(x)[:, 0].mean()) for _, net in nets]  # two neighbours
    assert result.folds == tuple(fold for fold, _ in nets) == (0, 1)
    np.testing.assert_allclose(result.fold_predictions, folds, rtol=1e-5)
    assert result.brain_age == pytest.approx(np.mean(folds), rel=1e-6)
    assert result.slice_z_mm == pytest.approx(float(view_affine(spec)[2, 3]))
    assert len(result.views_z_mm) == 3 and result.views_z_mm[0] == result.slice_z_mm
    # a card from before prediction.views predicts from the medial slice alone
    medial = _medial_only(models)
    assert len(medial.prepare(scan)) == 1
    with torch.no_grad():
        alone = [float(net(x[:1])[0, 0]) for _, net in nets]
    np.testing.assert_allclose(medial.predict(scan, reconstruct=False).fold_predictions, alone,
                               rtol=1e-5)


def test_single_view_passes_are_those_of_mc_dropout_age(exported):
    """Dropout of the age MLP on, batch norm on its running statistics, z_sem once per fold:
    with one view the passes are mc_dropout_age's with that fold's generator."""
    models, scan = exported
    predictor = _medial_only(models)
    result = predictor.predict(scan, seed=7, reconstruct=False)
    _, spec, nets = _nets_by_hand(models)
    x = torch.from_numpy(prepare_slice_views(scan, spec)[0])[None, None]
    for k, (fold, net) in enumerate(nets):
        expected = mc_dropout_age(net, x, samples=MC_SAMPLES,
                                  generator=torch.Generator().manual_seed(_fold_seed(7, fold)))
        assert result.fold_mc_means[k] == pytest.approx(float(expected["mean"][0]), rel=1e-6)
        assert result.fold_mc_sds[k] == pytest.approx(float(expected["sd"][0]), rel=1e-5)
        assert float(expected["deterministic"][0]) == pytest.approx(result.fold_predictions[k],
                                                                    rel=1e-5)
    assert all(not net.training for net in predictor.networks)  # left in eval mode


def test_the_views_of_a_pass_share_one_dropout_mask(exported, predictor):
    """A pass is one thinned network applied to every view: three copies of the medial slice
    give exactly the passes of the slice alone (independent masks would not)."""
    _, scan = exported
    medial = predictor.prepare(scan)[0]
    one = predictor.predict_prepared([medial], seed=3, reconstruct=False)
    three = predictor.predict_prepared([medial, medial, medial], seed=3, reconstruct=False)
    # up to float32 rounding of a batch of three against one (independent masks would move the
    # means by years: the passes' SD here is tens of years)
    assert min(one.fold_mc_sds) > 1
    assert three.fold_mc_means == pytest.approx(one.fold_mc_means, abs=2e-3)
    assert three.fold_mc_sds == pytest.approx(one.fold_mc_sds, abs=2e-3)
    assert (three.lower, three.upper) == pytest.approx((one.lower, one.upper), abs=2e-3)


def test_interval_is_mc_dropout_of_the_age_mlp_pooled_over_folds(exported, predictor, result):
    models, scan = exported
    assert result.interval == "mc-dropout" and result.mc_samples == MC_SAMPLES
    assert result.lower < result.brain_age < result.upper
    assert result.upper - result.lower > 0 and result.mc_sd > 0
    # the interval is the 2.5-97.5 percentile of the passes of both folds pooled
    _, spec, nets = _nets_by_hand(models)
    x = torch.from_numpy(np.stack(prepare_slice_views(scan, spec)))[:, None]
    pooled = []
    for fold, net in nets:
        with torch.no_grad():
            z = net.encode(x)
        pooled.append(_mc_passes(net, z, MC_SAMPLES,
                                 torch.Generator().manual_seed(_fold_seed(7, fold))))
    pooled = np.concatenate(pooled)
    assert pooled.size == 2 * MC_SAMPLES
    assert (result.lower, result.upper) == pytest.approx(tuple(np.percentile(pooled, [2.5, 97.5])),
                                                         rel=1e-6)
    assert result.mc_sd == pytest.approx(pooled.std(ddof=1), rel=1e-6)
    assert result.mc_mean == pytest.approx(np.mean(result.fold_mc_means), rel=1e-9)


def test_same_seed_same_output_other_seed_other_interval(exported, predictor, result):
    _, scan = exported
    again = predictor.predict(scan, seed=7, reconstruct=False)
    assert (again.brain_age, again.lower, again.upper, again.mc_sd) == \
        (result.brain_age, result.lower, result.upper, result.mc_sd)
    assert again.fold_mc_means == result.fold_mc_means
    # a fresh predictor (weights loaded again) and the convenience function agree too
    fresh = predict_diffusion_ae(scan, models_dir=exported[0], seed=7)
    assert (fresh.lower, fresh.upper) == (result.lower, result.upper)
    np.testing.assert_array_equal(fresh.reconstruction.reconstruction,
                                  result.reconstruction.reconstruction)
    other = predictor.predict(scan, seed=8, reconstruct=False)
    assert other.brain_age == result.brain_age  # the point estimate has no randomness
    assert (other.lower, other.upper) != (result.lower, result.upper)


def test_reconstruction_of_the_first_fold_with_monai_ssim_and_psnr(exported, predictor, result):
    from monai.metrics import PSNRMetric, SSIMMetric

    models, scan = exported
    rec = result.reconstruction
    assert rec.fold == 0 and rec.ddim_steps == DDIM_STEPS
    size = predictor.spec.size
    for array in (rec.input_slice, rec.reconstruction, rec.difference):
        assert array.shape == (size, size) and array.dtype == np.float32
        assert array.min() >= 0.0 and array.max() <= 1.0
    np.testing.assert_array_equal(rec.input_slice, predictor.prepare(scan)[0])  # medial
    np.testing.assert_allclose(rec.difference, np.abs(rec.reconstruction - rec.input_slice),
                               atol=1e-7)
    # the same as encoding and decoding by hand with the first fold's network, clipped
    _, spec, nets = _nets_by_hand(models)
    x = torch.from_numpy(rec.input_slice)[None, None]
    direct = ddim_reconstruct(nets[0][1], x, DDIM_STEPS).clamp(0, 1)[0, 0].numpy()
    np.testing.assert_allclose(rec.reconstruction, direct, atol=1e-5)
    # SSIM and PSNR are MONAI's on the returned arrays (data range 1)
    a = torch.from_numpy(rec.reconstruction)[None, None]
    b = torch.from_numpy(rec.input_slice)[None, None]
    ssim = float(SSIMMetric(spatial_dims=2, data_range=1.0)(a, b).mean())
    psnr = float(PSNRMetric(max_val=1.0)(a, b).mean())
    assert rec.ssim == pytest.approx(ssim, rel=1e-5) and rec.psnr == pytest.approx(psnr, rel=1e-5)
    assert 0 < rec.ssim <= 1
    # --ddim-steps: another number of steps, another reconstruction
    fewer = predictor.reconstruct(rec.input_slice, ddim_steps=2)
    assert fewer.ddim_steps == 2 and not np.array_equal(fewer.reconstruction, rec.reconstruction)
    steps = DiffusionAEPredictor.from_models_dir(models, ddim_steps=3)
    assert steps.ddim_steps == 3 and steps.reconstruct(rec.input_slice).ddim_steps == 3


def test_slices_are_one_plane_images_in_mni_space(predictor, result):
    images = result.reconstruction.images(predictor.spec)
    assert set(images) == set(SLICE_SUFFIXES.values())
    spec = predictor.spec
    for suffix, img in images.items():
        assert img.shape == (spec.size, spec.size, 1) and img.get_data_dtype() == np.float32
        # pixel (i, j) where view_affine puts it; the plane is one cube plane thick
        np.testing.assert_allclose(img.affine, view_affine(spec))
        assert img.affine[2, 2] > 0 and abs(np.linalg.det(img.affine)) > 0
        assert int(img.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(images["reconslice"].dataobj)[:, :, 0],
                                  result.reconstruction.reconstruction)


def test_provenance_and_details_are_json(result):
    provenance = json.loads(json.dumps(result.provenance()))
    assert provenance["MCDropoutSamplesPerFold"] == MC_SAMPLES and provenance["MCDropoutSeed"] == 7
    assert provenance["Reconstruction"]["SSIM"] == result.reconstruction.ssim
    assert provenance["Reconstruction"]["DDIMSteps"] == DDIM_STEPS
    # the card's held-out reconstruction quality, when the export wrote it, for comparison
    details = json.loads(json.dumps(result.details()))
    assert details["interval"] == "mc-dropout" and len(details["fold_mc_sds"]) == 2
    assert details["reconstruction"]["fold"] == 0


def test_card_without_mc_passes_gives_the_fold_interval(exported, caplog):
    from bidsapp.inference.densenet_clinical import fold_interval

    models, scan = exported
    card, folder = read_card("diffusion-ae", models)
    card["prediction"]["mc_dropout_samples"] = 0
    with caplog.at_level(logging.INFO, logger="brainage.inference"):
        result = DiffusionAEPredictor(card, folder).predict(scan, reconstruct=False)
    assert result.interval == "fold-spread" and result.mc_samples == 0
    assert np.isnan(result.mc_sd) and result.reconstruction is None
    _, lower, upper = fold_interval(result.fold_predictions)
    assert (result.lower, result.upper) == pytest.approx((lower, upper))
    assert "fold spread" in result.notes[0] and result.notes[0] in caplog.text
    assert result.provenance()["MCDropoutSD"] is None


def test_tampered_or_invalid_cards_are_refused(exported, tmp_path):
    models, _ = exported
    with pytest.raises(ModelError, match="fail the sha256 check"):
        DiffusionAEPredictor.from_models_dir(tampered_copy(models, tmp_path / "models", "diffusion-ae"))
    card, folder = read_card("diffusion-ae", models)
    with pytest.raises(ModelError, match="not a diffusion-ae model"):
        DiffusionAEPredictor({**card, "family": "mlens"}, folder)
    with pytest.raises(ModelError, match="mc_dropout_samples must be 0"):
        DiffusionAEPredictor({**card, "prediction": {**card["prediction"],
                                                     "mc_dropout_samples": 1}}, folder)
    with pytest.raises(ModelError, match="ddim_steps must be an integer >= 1"):
        DiffusionAEPredictor({**card, "prediction": {**card["prediction"], "ddim_steps": 0}},
                             folder)
    with pytest.raises(ModelError, match="prediction.views must be one of"):
        DiffusionAEPredictor({**card, "prediction": {**card["prediction"], "views": "some"}},
                             folder)
    with pytest.raises(ModelError, match="incomplete or invalid"):
        DiffusionAEPredictor({k: v for k, v in card.items() if k != "input"}, folder)
    with pytest.raises(ValueError, match="cannot exceed"):
        DiffusionAEPredictor(card, folder, ddim_steps=101)
    with pytest.raises(ModelError, match="no diffusion-ae model card"):
        DiffusionAEPredictor.from_models_dir(tmp_path / "nowhere")


def test_ddim_request_is_checked_against_the_installed_card(exported, caplog):
    models, _ = exported
    card, _ = read_card("diffusion-ae", models)
    check_ddim_request(card, 100, models)  # the tiny model has 100 timesteps
    with pytest.raises(UsageError, match="--ddim-steps 101 exceeds the 100 diffusion timesteps"):
        check_ddim_request(card, 101, models)
    with caplog.at_level(logging.WARNING, logger="brainage.inference"):
        check_ddim_request(None, 20, models)
    assert "--ddim-steps 20 has no effect" in caplog.text


def test_models_workflow_writes_the_row_the_slices_and_the_report_section(exported, tmp_path):
    from model_workflows import run_models_into_sink

    from bidsapp.group import _MAP_RE
    from bidsapp.reports import generate_participant_report
    from bidsapp.workflows.models import init_models_wf

    models, scan = exported
    models_wf = init_models_wf(models=["diffusion-ae"], ddim_steps=3, random_seed=7)
    node = models_wf.get_node("diffusion_ae")
    assert (node.inputs.ddim_steps, node.inputs.random_seed) == (3, 7)
    node.inputs.models_dir = str(models)
    models_wf.inputs.inputnode.std_t1w = str(scan)
    anat = run_models_into_sink(models_wf, tmp_path, "s003", 40.0, raw_t1w=scan)
    expected = DiffusionAEPredictor.from_models_dir(models, ddim_steps=3).predict(scan, seed=7)
    lines = (anat / "sub-s003_brainage.tsv").read_text().splitlines()
    assert len(lines) == 2
    row = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
    assert row["model"] == "diffusion-ae"
    for column, value in (("brain_age", expected.brain_age), ("brain_age_lower", expected.lower),
                          ("brain_age_upper", expected.upper),
                          ("brain_pad", expected.brain_age - 40.0)):
        assert float(row[column]) == pytest.approx(value, abs=1e-3)
    sidecar = json.loads((anat / "sub-s003_brainage.json").read_text())
    provenance = sidecar["ModelProvenance"]["diffusion-ae"]
    assert provenance["Reconstruction"]["DDIMSteps"] == 3 and provenance["MCDropoutSeed"] == 7
    assert provenance["MCDropoutSD"] == pytest.approx(expected.mc_sd)
    prefix = "sub-s003_space-MNI152NLin2009aSym_desc-diffusionae_"
    for suffix in ("inputslice", "reconslice", "reconerrorslice"):
        img = nib.load(anat / f"{prefix}{suffix}.nii.gz")
        assert img.shape == (32, 32, 1)
        meta = json.loads((anat / f"{prefix}{suffix}.json").read_text())
        assert meta["Model"] == "diffusion-ae" and meta["DDIMSteps"] == 3
        assert meta["SpatialReference"].startswith("https://") and meta["Sources"]
        assert "32 x 32 pixels" in meta["Slice"] and meta["Resolution"]
        if suffix != "inputslice":
            assert meta["SSIM"] == pytest.approx(expected.reconstruction.ssim, rel=1e-6)
    np.testing.assert_allclose(
        np.asarray(nib.load(anat / f"{prefix}reconslice.nii.gz").dataobj)[:, :, 0],
        expected.reconstruction.reconstruction, atol=1e-6)
    # the group level takes none of the slices for a brain-age or relevance map
    assert not [p for p in anat.iterdir() if _MAP_RE.search(p.name)]
    # the report: the section with the numbers and one figure of three panels
    out = anat.parents[1]
    report = generate_participant_report(out, "s003", run_uuid="test").read_text()
    section = report[report.index("Diffusion autoencoder (diffusion-ae)"):]
    assert f"{expected.reconstruction.ssim:.4f}" in section
    assert f"[{expected.lower:,.1f}, {expected.upper:,.1f}] years" in section
    assert f"{MC_SAMPLES} passes x 2 folds pooled" in section
    figures = re.findall(r'src="(sub-s003/figures/[^"]+)"', section)
    assert figures and figures[0].startswith(f"sub-s003/figures/{prefix}reconslice.")
    assert (out / figures[0]).is_file()
    assert "input slice, reconstruction and difference" in section
    assert "branches ?" not in report  # vgg-cbv's provenance line is not drawn for this model


def test_participant_workflow_gives_the_node_ddim_steps_and_the_seed(tiny_bids, tmp_path):
    from bidsapp.bids.layout import collect_t1w_units
    from bidsapp.workflows.base import init_single_t1w_wf

    (unit,) = collect_t1w_units(tiny_bids, participant_labels=["01"])
    workflow = init_single_t1w_wf(unit=unit, output_dir=tmp_path / "out", random_seed=5,
                                  models=["diffusion-ae", "ensemble"], ddim_steps=12)
    node = workflow.get_node("models_wf.diffusion_ae")
    assert (node.inputs.ddim_steps, node.inputs.random_seed) == (12, 5)
    assert node.mem_gb == 1.5
    plain = init_single_t1w_wf(unit=unit, output_dir=tmp_path / "out", models=["diffusion-ae"])
    assert not isdefined(plain.get_node("models_wf.diffusion_ae").inputs.ddim_steps)


def test_report_slice_names_are_the_predictor_suffixes():
    from bidsapp.reports import participant

    assert participant._DIFFUSION_AE_SLICES == tuple(SLICE_SUFFIXES.values())
