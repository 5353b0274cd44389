"""Inference with an mlens card: checked weights, heads and top level, intervals, LRP maps,
the nipype interface and the models workflow writing the brain-age table and the MNI map."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bidsapp.errors import ModelError
from bidsapp.inference.mlens import MLensPredictor, fold_halfwidth, predict_mlens
from bidsapp.inference.weights import sha256_file
from bidsapp.nets import MLENS_RELU, MLensCNN
from bidsapp.transforms.mni_pruned import MNIPrunedSpec, prepare_mni_input, pruning_box

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from training.synthetic import make_synthetic_dataset  # noqa: E402

RES = 8.0
NET = {"filters": [4, 4, 8, 8, 4], "dense_units": 6}


def write_card(folder: Path, regions=("whole",), folds=(0, 1), n_base=3, method="ensemble") -> dict:
    """An mlens card with random base models and known heads (as brainage-train writes it):
    ``<folder>/mlens/model_card.json`` next to ``<sub-ensemble>_base{bb}_fold{k}.pt``."""
    subs, weights, heads = [], [], []
    for region in regions:
        spec = MNIPrunedSpec(resolution_mm=RES, region=region)
        box = pruning_box(spec)
        shape = [s.stop - s.start for s in box]
        subs.append({"name": f"T1w-{region}", "sequence": "T1w", "region": region,
                     "input": {**spec.to_dict(), "shape": shape, "box": [[s.start, s.stop] for s in box]},
                     "net_kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                                    "in_shape": shape, "act": ["relu", {"inplace": False}], **NET}})
    for k in folds:
        fold_heads = []
        for j, sub in enumerate(subs):
            for b in range(n_base):
                torch.manual_seed(100 * k + 10 * j + b)
                kwargs = dict(sub["net_kwargs"], act=MLENS_RELU)
                net = MLensCNN(**kwargs, output_bias=45.0 + b)
                path = folder / "mlens" / f"{sub['name']}_base{b:02d}_fold{k}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(net.state_dict(), path)
                weights.append({"fold": k, "subensemble": sub["name"], "member": b,
                                "file": path.name, "sha256": sha256_file(path)})
            fold_heads.append({"coef": list(np.linspace(0.2, 0.5, n_base) * (1 + 0.1 * k)),
                               "intercept": 3.0 + j, "n_val": 5})
        heads.append(fold_heads)
    card = {"id": "mlens", "family": "mlens", "variant": "test", "weights": weights,
            "ensemble": {"type": "i" if regions == ("whole",) else "ii", "folds": list(folds),
                         "base_models": n_base, "subensembles": subs, "heads": heads,
                         "head_alpha": 1.0,
                         "top": {"coef": list(np.linspace(0.6, 0.3, len(subs))), "intercept": -2.0},
                         "interval": {"method": method, "level": 0.95, "calibrated_halfwidth": 7.5}}}
    (folder / "mlens" / "model_card.json").write_text(json.dumps(card))
    return card


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    _, derivs = make_synthetic_dataset(tmp_path_factory.mktemp("scan"), [30.0, 70.0],
                                       shape=(12, 12, 12), mni=True)
    return next((derivs / "sub-s001" / "anat").glob("*space-MNI152NLin2009aSym*T1w.nii.gz"))


def _manual(card, folder, scan):
    """The MLens prediction computed by hand from the card and the base networks."""
    ens = card["ensemble"]
    per_fold, bases = [], []
    for i, k in enumerate(ens["folds"]):
        row = []
        for j, sub in enumerate(ens["subensembles"]):
            spec = MNIPrunedSpec.from_dict({q: v for q, v in sub["input"].items() if q not in ("shape", "box")})
            x = torch.from_numpy(prepare_mni_input(scan, spec).data.astype(np.float32))[None, None]
            preds = []
            for w in card["weights"]:
                if w["fold"] == k and w["subensemble"] == sub["name"]:
                    net = MLensCNN(**dict(sub["net_kwargs"], act=MLENS_RELU))
                    net.load_state_dict(torch.load(folder / w["file"], weights_only=True))
                    with torch.no_grad():
                        preds.append(float(net.eval()(x)))
            head = ens["heads"][i][j]
            row.append(float(np.dot(head["coef"], preds) + head["intercept"]))
            bases.append(preds)
        per_fold.append(row)
    per_fold = np.array(per_fold)
    age = float(per_fold.mean(0) @ ens["top"]["coef"] + ens["top"]["intercept"])
    return age, per_fold, bases


@pytest.mark.parametrize("regions", [("whole",), ("cortical", "subcortical", "cerebellum")])
def test_prediction_matches_the_card_by_hand(tmp_path, scan, regions):
    card = write_card(tmp_path, regions=regions)
    result = MLensPredictor.from_models_dir(tmp_path).predict(scan)
    age, per_fold, bases = _manual(card, tmp_path / "mlens", scan)
    assert result.brain_age == pytest.approx(age, abs=1e-4)
    assert list(result.subensembles.values()) == pytest.approx(list(per_fold.mean(0)), abs=1e-4)
    if len(regions) == 1:   # one sub-ensemble: the spread of its base models, per fold
        half = np.mean([fold_halfwidth(bases[i]) for i in range(2)])
    else:                   # several: the spread across sub-ensembles, per fold
        half = np.mean([fold_halfwidth(per_fold[i]) for i in range(2)])
    assert (result.lower, result.upper) == pytest.approx((age - half, age + half), abs=1e-4)
    assert result.calibrated_interval == pytest.approx((age - 7.5, age + 7.5), abs=1e-4)
    assert len(result.fold_predictions) == 2
    assert json.loads(json.dumps(result.details()))["interval_method"] == "ensemble"


def test_calibrated_interval_method(tmp_path, scan):
    write_card(tmp_path, method="calibrated")
    result = predict_mlens(scan, models_dir=tmp_path)
    assert (result.lower, result.upper) == pytest.approx((result.brain_age - 7.5, result.brain_age + 7.5))


def test_tampered_or_inconsistent_cards_are_refused(tmp_path, scan):
    card = write_card(tmp_path)
    weights = tmp_path / "mlens" / card["weights"][0]["file"]
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="sha256"):
        MLensPredictor.from_models_dir(tmp_path)
    card = write_card(tmp_path)
    with pytest.raises(ModelError, match="not an mlens model"):
        MLensPredictor({**card, "family": "densenet-clinical"}, tmp_path / "mlens")
    moved = json.loads(json.dumps(card))
    moved["ensemble"]["subensembles"][0]["input"]["box"][0][0] += 1
    with pytest.raises(ModelError, match="pruning box"):
        MLensPredictor(moved, tmp_path / "mlens")
    partial = {**card, "weights": [w for w in card["weights"] if w["fold"] == 0]}
    with pytest.raises(ModelError, match="no weights"):
        MLensPredictor(partial, tmp_path / "mlens")
    with pytest.raises(ModelError, match="no mlens model card"):
        MLensPredictor.from_models_dir(tmp_path / "nowhere")


def test_relevance_maps_average_the_base_models(tmp_path, scan):
    write_card(tmp_path, regions=("cortical", "cerebellum"))
    predictor = MLensPredictor.from_models_dir(tmp_path)
    inputs = predictor.prepare(scan)
    maps = predictor.relevance_maps(inputs, folds=[1])
    for sub, (volume, evidence) in maps.items():
        assert len(evidence) == 3 and volume.shape == inputs[sub].shape
        np.testing.assert_allclose(volume.affine, inputs[sub].affine)
        assert float(volume.data.sum()) == pytest.approx(float(evidence.mean()), rel=1e-3, abs=1e-5)
        outside = inputs[sub].data == 0
        assert np.abs(volume.data).max() > 0 and outside.any()
    img = predictor.relevance_image(inputs, folds=[1])
    assert img.shape == (99, 117, 95)
    with pytest.raises(ValueError, match="subset"):
        predictor.relevance_maps(inputs, folds=[7])


def test_interface_and_models_workflow_write_table_and_map(tmp_path, scan):
    from model_workflows import run_models_into_sink

    from bidsapp.workflows.models import MODEL_INPUT_FIELDS, init_models_wf

    models = tmp_path / "models"
    models.mkdir()
    write_card(models, regions=("cortical", "subcortical"))
    assert "std_t1w" in MODEL_INPUT_FIELDS
    models_wf = init_models_wf(models=["mlens"])
    models_wf.get_node("mlens").inputs.models_dir = str(models)
    models_wf.inputs.inputnode.std_t1w = str(scan)
    anat = run_models_into_sink(models_wf, tmp_path, "s001", 70.0, raw_t1w=scan)
    expected = predict_mlens(scan, models_dir=models)
    table = (anat / "sub-s001_brainage.tsv").read_text().splitlines()
    row = dict(zip(table[0].split("\t"), table[1].split("\t")))
    assert row["model"] == "mlens"
    assert float(row["brain_age"]) == pytest.approx(expected.brain_age, abs=1e-3)
    assert float(row["brain_age_lower"]) == pytest.approx(expected.lower, abs=1e-3)
    assert float(row["brain_age_upper"]) == pytest.approx(expected.upper, abs=1e-3)
    assert float(row["brain_pad"]) == pytest.approx(expected.brain_age - 70.0, abs=1e-3)
    relevance = anat / "sub-s001_space-MNI152NLin2009aSym_res-2_desc-mlens_relevancemap.nii.gz"
    img = nib.load(relevance)
    assert img.shape == (99, 117, 95)
    sidecar = json.loads(relevance.with_name(relevance.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Model"] == "mlens" and sidecar["Units"] == "years"
    # the map of fold 0 (the default) sums to what its base models put above the output bias
    predictor = MLensPredictor.from_models_dir(models)
    evidence = sum(float(e.mean()) for _, e in predictor.relevance_maps(predictor.prepare(scan), [0]).values())
    assert float(np.asarray(img.dataobj).sum()) == pytest.approx(evidence, rel=0.05, abs=1e-3)
    record = json.loads(Path(next((tmp_path / "work").rglob("prediction.json"))).read_text())
    assert record["details"]["lrp"]["folds"] == [0]
    assert set(record["details"]["subensembles"]) == {"T1w-cortical", "T1w-subcortical"}
