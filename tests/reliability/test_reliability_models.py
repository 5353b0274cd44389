"""Reliability: model weights, checked before any processing (exit 65, naming the file), and the
model options --cbv-model and --ddim-steps (exit 64/65/66, nothing written).

Already covered and not repeated: an unknown model id (``--models resnet``, exit 64) and
``--device cuda`` without a GPU (exit 64) in tests/cli/test_exit_codes.py; the sha256 and
``weights_only`` checks of the loaders in tests/inference.
"""

from __future__ import annotations

import shutil

import pytest
from reliability_cases import assert_nothing_written, one_error_line, run_brainage, write_densenet_card


@pytest.fixture
def models(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(folder))
    return folder


def _run(capsys, dataset, tmp_path, *models):
    return run_brainage(capsys, dataset, tmp_path / "out", "--models", *models)


@pytest.mark.parametrize("selection", [["all"], ["densenet-clinical"]])
def test_tampered_weights_are_65_before_processing(dataset, tmp_path, capsys, models, selection):
    weights = write_densenet_card(models)
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0xFF
    weights.write_bytes(bytes(raw))
    code, err = _run(capsys, dataset, tmp_path, *selection)
    line = one_error_line(err)
    assert code == 65 and f"model weights {weights} fail the sha256 check" in line
    assert "reinstall brainage" in line
    assert_nothing_written(tmp_path / "out")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_missing_weights_file_is_65(dataset, tmp_path, capsys, models):
    weights = write_densenet_card(models)
    weights.unlink()
    code, err = _run(capsys, dataset, tmp_path, "densenet-clinical")
    line = one_error_line(err)
    assert code == 65 and f"model weights {weights} are missing" in line and "BRAINAGE_MODELS_DIR" in line
    assert_nothing_written(tmp_path / "out")


def test_requested_model_without_a_card_is_65(dataset, tmp_path, capsys, models):
    code, err = _run(capsys, dataset, tmp_path, "mlens")
    line = one_error_line(err)
    assert code == 65 and f"model(s) mlens have no weights in {models}" in line
    assert "--models all or none" in line
    assert_nothing_written(tmp_path / "out")


def test_model_card_that_is_not_json_is_65(dataset, tmp_path, capsys, models):
    (models / "densenet-clinical").mkdir()
    (models / "densenet-clinical" / "model_card.json").write_text('{"id": "densenet-clinical",')
    code, err = _run(capsys, dataset, tmp_path, "all")
    line = one_error_line(err)
    assert code == 65 and "densenet-clinical/model_card.json is not valid JSON" in line
    assert_nothing_written(tmp_path / "out")


# --cbv-model: the CBV branch of vgg-cbv is refused up front when it cannot run (nothing written)

@pytest.fixture
def cbv_checkpoint(tmp_path):
    from vgg_cbv_models import write_cbv_checkpoint

    return write_cbv_checkpoint(tmp_path / "cbv_synth.pt")


def _run_cbv(capsys, dataset, tmp_path, checkpoint, *models):
    return run_brainage(capsys, dataset, tmp_path / "out", "--models", *models,
                        "--cbv-model", checkpoint)


def _assert_refused(tmp_path):
    assert_nothing_written(tmp_path / "out")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


@pytest.mark.parametrize("selection", [["vgg-cbv"], ["all"]])
def test_cbv_model_with_a_t1w_only_vgg_cbv_is_65(dataset, tmp_path, capsys, models, tiny_vgg_cbv,
                                                 cbv_checkpoint, selection):
    shutil.copytree(tiny_vgg_cbv[0], models, dirs_exist_ok=True)
    code, err = _run_cbv(capsys, dataset, tmp_path, cbv_checkpoint, *selection)
    line = one_error_line(err)
    assert code == 65 and f"--cbv-model: the vgg-cbv model in {models}" in line
    assert "T1w-branch weights only, no CBV branch" in line and "run without --cbv-model" in line
    _assert_refused(tmp_path)


def test_cbv_model_without_any_vgg_cbv_is_65(dataset, tmp_path, capsys, models, cbv_checkpoint):
    code, err = _run_cbv(capsys, dataset, tmp_path, cbv_checkpoint, "all")
    line = one_error_line(err)
    assert code == 65 and f"no vgg-cbv model is installed in {models}" in line
    _assert_refused(tmp_path)


def test_cbv_model_that_is_not_a_cbv_checkpoint_is_65(dataset, tmp_path, capsys, models, tiny_vgg_cbv):
    from vgg_cbv_models import add_cbv_branch

    shutil.rmtree(models)
    add_cbv_branch(tiny_vgg_cbv[0], models)
    weights = next(models.rglob("*.pt"))  # a VGG8 state dict, not a synthesis checkpoint
    code, err = _run_cbv(capsys, dataset, tmp_path, weights, "vgg-cbv")
    line = one_error_line(err)
    assert code == 65 and f"{weights} is not a CBV synthesis checkpoint" in line
    _assert_refused(tmp_path)


def test_cbv_model_for_models_without_vgg_cbv_is_64(dataset, tmp_path, capsys, models, cbv_checkpoint):
    code, err = _run_cbv(capsys, dataset, tmp_path, cbv_checkpoint, "densenet-clinical")
    line = one_error_line(err)
    assert code == 64 and "--cbv-model feeds the CBV branch of vgg-cbv, which --models " \
                          "densenet-clinical does not run" in line
    _assert_refused(tmp_path)


def test_missing_cbv_model_file_is_66(dataset, tmp_path, capsys, models):
    code, err = _run_cbv(capsys, dataset, tmp_path, tmp_path / "absent.pt", "all")
    line = one_error_line(err)
    assert code == 66 and f"--cbv-model file {tmp_path / 'absent.pt'} does not exist" in line
    _assert_refused(tmp_path)


# --ddim-steps: the DDIM steps of the diffusion-ae reconstruction, refused up front (nothing
# written) when they are not an integer >= 1, when diffusion-ae does not run, or when the
# installed model's diffusion has fewer timesteps

@pytest.mark.parametrize("steps", ["0", "-5"])
def test_ddim_steps_below_one_is_64(dataset, tmp_path, capsys, models, steps):
    code, err = run_brainage(capsys, dataset, tmp_path / "out", "--models", "all",
                             "--ddim-steps", steps)
    line = one_error_line(err)
    assert code == 64 and f"--ddim-steps must be an integer >= 1 (the DDIM steps of the " \
                          f"diffusion-ae reconstruction), got {steps}" in line
    assert "leave it out for the model card's value" in line
    _assert_refused(tmp_path)


def test_ddim_steps_for_models_without_diffusion_ae_is_64(dataset, tmp_path, capsys, models):
    code, err = run_brainage(capsys, dataset, tmp_path / "out", "--models", "densenet-clinical",
                             "--ddim-steps", "20")
    line = one_error_line(err)
    assert code == 64 and "--ddim-steps sets the reconstruction of diffusion-ae, which --models " \
                          "densenet-clinical does not run" in line
    _assert_refused(tmp_path)


def test_ddim_steps_beyond_the_model_timesteps_is_64(dataset, tmp_path, capsys, models,
                                                      tiny_diffusion_ae):
    shutil.copytree(tiny_diffusion_ae[0], models, dirs_exist_ok=True)
    code, err = run_brainage(capsys, dataset, tmp_path / "out", "--models", "diffusion-ae",
                             "--ddim-steps", "101")
    line = one_error_line(err)
    assert code == 64 and f"--ddim-steps 101 exceeds the 100 diffusion timesteps of the " \
                          f"diffusion-ae model in {models}; use at most 100" in line
    _assert_refused(tmp_path)
