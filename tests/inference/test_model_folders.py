"""Model folders: every shipped weight file has its model card next to it, and the registry finds
cards as ``<models_dir>/<id>/model_card.json`` (and, deprecated, as ``<models_dir>/<id>.json``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from bidsapp.errors import ModelError
from bidsapp.inference.registry import (CARD_NAME, available_models, read_card, resolve_models,
                                        verify_models, weight_card, weight_card_path)
from bidsapp.inference.weights import sha256_file

REPO = Path(__file__).resolve().parents[2]


def layout_problems(models: Path) -> list[str]:
    """What breaks "one self-contained folder per model" under ``models``.

    Every ``*.pt`` needs ``model_card.json`` in its own folder naming it with the file's sha256,
    and beside it its own card ``<stem>.json`` equal to what
    :func:`~bidsapp.inference.registry.weight_card` derives from the model card; every weights
    entry of every card must be a file directly in the card's folder.
    """
    problems = []
    cards: dict[Path, dict] = {}
    models_cards: dict[Path, dict] = {}
    for card_path in sorted(models.rglob(CARD_NAME)):
        try:
            models_cards[card_path.parent] = json.loads(card_path.read_text())
            cards[card_path.parent] = {w["file"]: w for w in models_cards[card_path.parent]["weights"]}
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{card_path}: unreadable card ({exc!r})")
    for folder, entries in cards.items():
        for name in entries:
            if Path(name).name != name:
                problems.append(f"{folder / CARD_NAME} names {name}, not a file next to the card")
            elif not (folder / name).is_file():
                problems.append(f"{folder / CARD_NAME} names {name}, which is missing")
    for weights in sorted(models.rglob("*.pt")):
        entries = cards.get(weights.parent)
        if entries is None:
            problems.append(f"{weights} has no {CARD_NAME} next to it")
        elif weights.name not in entries:
            problems.append(f"{weights} is not named by the card next to it")
        elif sha256_file(weights) != entries[weights.name]["sha256"]:
            problems.append(f"{weights} does not have the sha256 its card gives")
        elif not weight_card_path(weights.parent, weights.name).is_file():
            problems.append(f"{weights} has no weight card {weights.stem}.json next to it")
        elif json.loads(weight_card_path(weights.parent, weights.name).read_text()) != weight_card(
                models_cards[weights.parent], entries[weights.name]):
            problems.append(f"{weights.stem}.json disagrees with the {CARD_NAME} next to it")
    return problems


def test_every_shipped_weight_file_has_its_card_next_to_it():
    shipped = sorted((REPO / "models").rglob("*.pt"))
    if not shipped:
        pytest.skip("no model weights in this checkout")
    assert layout_problems(REPO / "models") == []
    assert not list((REPO / "models").glob("*.json")), "a card outside its model folder"


def test_every_shipped_checkpoint_is_at_most_50_mb_and_loads_weights_only():
    shipped = sorted((REPO / "models").rglob("*.pt"))
    if not shipped:
        pytest.skip("no model weights in this checkout")
    too_big = [f"{p.relative_to(REPO)}: {p.stat().st_size / 1e6:.1f} MB" for p in shipped
               if p.stat().st_size > 50 * 1024 ** 2]
    assert not too_big
    for path in shipped:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = [v for v in (state.get("model", state)).values() if torch.is_tensor(v)]
        assert tensors and all(torch.isfinite(t.float()).all() for t in tensors), path


def test_the_layout_check_finds_stray_tampered_and_missing_files(tmp_path):
    source = REPO / "models" / "densenet-clinical"
    if not (source / CARD_NAME).is_file():
        pytest.skip("no densenet-clinical model shipped in this checkout")
    models = tmp_path / "models"
    shutil.copytree(source, models / "densenet-clinical")
    assert layout_problems(models) == []
    folder = models / "densenet-clinical"

    shutil.copy(folder / "fold0.pt", folder / "fold9.pt")          # stray: no card entry
    assert layout_problems(models) == [f"{folder / 'fold9.pt'} is not named by the card next to it"]
    (folder / "fold9.pt").unlink()

    (folder / "sub").mkdir()                                        # a level below the card
    shutil.move(folder / "fold1.pt", folder / "sub" / "fold1.pt")
    assert sorted(layout_problems(models)) == sorted([
        f"{folder / CARD_NAME} names fold1.pt, which is missing",
        f"{folder / 'sub' / 'fold1.pt'} has no {CARD_NAME} next to it"])
    shutil.move(folder / "sub" / "fold1.pt", folder / "fold1.pt")

    raw = bytearray((folder / "fold2.pt").read_bytes())             # tampered
    raw[len(raw) // 2] ^= 0xFF
    (folder / "fold2.pt").write_bytes(bytes(raw))
    assert layout_problems(models) == [f"{folder / 'fold2.pt'} does not have the sha256 its card gives"]


def test_the_layout_check_finds_missing_and_stale_weight_cards(tmp_path):
    source = REPO / "models" / "densenet-clinical"
    if not (source / CARD_NAME).is_file():
        pytest.skip("no densenet-clinical model shipped in this checkout")
    models = tmp_path / "models"
    shutil.copytree(source, models / "densenet-clinical")
    folder = models / "densenet-clinical"
    (folder / "fold3.json").unlink()
    assert layout_problems(models) == [f"{folder / 'fold3.pt'} has no weight card fold3.json next to it"]
    stale = json.loads((folder / "fold4.json").read_text())
    stale["weights"]["sha256"] = "0" * 64
    shutil.copy(source / "fold3.json", folder / "fold3.json")
    (folder / "fold4.json").write_text(json.dumps(stale))
    assert layout_problems(models) == [f"fold4.json disagrees with the {CARD_NAME} next to it"]


def _weights(path: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.randn(4, 3)}, path)
    return {"fold": seed, "file": None, "sha256": sha256_file(path)}


def _new_model(models: Path, model_id: str, n: int = 2) -> dict:
    """``<models>/<id>/model_card.json`` next to ``fold{k}.pt``."""
    weights = []
    for k in range(n):
        entry = _weights(models / model_id / f"fold{k}.pt", k)
        weights.append({**entry, "file": f"fold{k}.pt"})
    card = {"id": model_id, "family": model_id, "weights": weights}
    (models / model_id / CARD_NAME).write_text(json.dumps(card))
    return card


def _old_model(models: Path, model_id: str, files: list[str]) -> dict:
    """The layout of earlier versions: ``<models>/<id>.json``, paths relative to ``<models>``."""
    weights = []
    for k, name in enumerate(files):
        entry = _weights(models / name, 10 + k)
        weights.append({**entry, "file": name})
    card = {"id": model_id, "family": model_id, "weights": weights}
    (models / f"{model_id}.json").write_text(json.dumps(card))
    return card


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_registry_reads_model_folders(tmp_path, monkeypatch, caplog):
    models = tmp_path / "models"
    card = _new_model(models, "densenet-clinical")
    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(models))
    with caplog.at_level(logging.WARNING, logger="brainage.inference"):
        assert available_models() == {"densenet-clinical": card}
        assert read_card("densenet-clinical") == (card, models / "densenet-clinical")
        assert read_card("densenet-clinical", models)[1] == models / "densenet-clinical"
        assert verify_models(["densenet-clinical", "ensemble"]) == {"densenet-clinical": card}
    assert _deprecations(caplog) == []
    with pytest.raises(ModelError, match=r"no mlens model card in .*mlens/model_card\.json"):
        read_card("mlens")
    with pytest.raises(ModelError, match="mlens have no weights"):
        resolve_models(["mlens"])
    raw = bytearray((models / "densenet-clinical" / "fold1.pt").read_bytes())
    raw[-5] ^= 0xFF
    (models / "densenet-clinical" / "fold1.pt").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="fold1.pt fail the sha256 check"):
        verify_models(["densenet-clinical"])


def test_registry_reads_the_earlier_layout_with_one_warning(tmp_path, monkeypatch, caplog):
    """Cards exported by earlier versions (``<id>.json``, paths relative to the models folder, mlens
    one level deeper per sub-ensemble), beside a model folder of this version."""
    models = tmp_path / "models"
    new = _new_model(models, "densenet-clinical")
    vgg = _old_model(models, "vgg-cbv", ["vgg-cbv/fold0.pt", "vgg-cbv/fold1.pt"])
    mlens = _old_model(models, "mlens", ["mlens/T1w-whole/base00_fold0.pt",
                                         "mlens/T1w-whole/base01_fold0.pt"])
    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(models))
    with caplog.at_level(logging.WARNING, logger="brainage.inference"):
        assert available_models() == {"densenet-clinical": new, "vgg-cbv": vgg, "mlens": mlens}
        assert read_card("vgg-cbv") == (vgg, models)
        assert read_card("mlens", models) == (mlens, models)
        assert set(verify_models(["vgg-cbv", "mlens", "densenet-clinical"])) == {
            "vgg-cbv", "mlens", "densenet-clinical"}
        assert resolve_models(["all"]) == ["mlens", "vgg-cbv", "densenet-clinical"]
    warnings = _deprecations(caplog)
    assert len(warnings) == 1 and str(models) in warnings[0] and CARD_NAME in warnings[0]
    (models / "vgg-cbv" / "fold1.pt").write_bytes(b"not the exported weights")
    with pytest.raises(ModelError, match=r"vgg-cbv/fold1\.pt fail the sha256 check"):
        verify_models(["vgg-cbv"])


def test_a_model_folder_wins_over_an_earlier_card_of_the_same_model(tmp_path, monkeypatch, caplog):
    models = tmp_path / "models"
    _old_model(models, "densenet-clinical", ["densenet-clinical/fold0.pt"])
    new = _new_model(models, "densenet-clinical", n=3)   # overwrites fold0.pt: the old card is stale
    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(models))
    with caplog.at_level(logging.WARNING, logger="brainage.inference"):
        assert read_card("densenet-clinical") == (new, models / "densenet-clinical")
        assert available_models() == {"densenet-clinical": new}
        verify_models(["densenet-clinical"])
    assert _deprecations(caplog) == []


def test_a_card_in_another_models_folder_is_ignored(tmp_path, monkeypatch, caplog):
    models = tmp_path / "models"
    _new_model(models, "mlens")
    (models / "mlens").rename(models / "my-mlens")
    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(models))
    with caplog.at_level(logging.WARNING, logger="brainage.inference"):
        assert available_models() == {}
    assert any("is for mlens, not my-mlens" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelError, match="no mlens model card"):
        read_card("mlens")
