"""Reliability: model weights, checked before any processing (exit 65, naming the file).

Already covered and not repeated: an unknown model id (``--models resnet``, exit 64) and
``--device cuda`` without a GPU (exit 64) in tests/cli/test_exit_codes.py; the sha256 and
``weights_only`` checks of the loaders in tests/inference.
"""

from __future__ import annotations

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
    (models / "densenet-clinical.json").write_text('{"id": "densenet-clinical",')
    code, err = _run(capsys, dataset, tmp_path, "all")
    line = one_error_line(err)
    assert code == 65 and "densenet-clinical.json is not valid JSON" in line
    assert_nothing_written(tmp_path / "out")
