"""Derivative names, atomic writes, dataset description and the brain-age table."""

import json
import subprocess
import shutil

import pytest

from bidsapp.derivatives import (BRAINAGE_COLUMNS, SourceEntities, atomic_write, derivative_path,
                                 write_bidsignore, write_brainage_table, write_dataset_description)


def test_names_follow_smriprep():
    src = SourceEntities.from_path("sub-01_ses-2_acq-mp2rage_run-3_T1w.nii.gz")
    assert derivative_path("/o", src, desc="brain", suffix="mask").as_posix() == \
        "/o/sub-01/ses-2/anat/sub-01_ses-2_acq-mp2rage_run-3_desc-brain_mask.nii.gz"
    assert derivative_path("/o", src, from_="T1w", to="MNI152NLin2009aSym", mode="image",
                           suffix="xfm", extension=".h5").name == \
        "sub-01_ses-2_acq-mp2rage_run-3_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5"
    with pytest.raises(ValueError, match="alphanumeric"):
        derivative_path("/o", src, desc="a_b", suffix="mask")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_brainage_table_roundtrip(tmp_path):
    import pandas as pd

    path = tmp_path / "sub-01_brainage.tsv"
    write_brainage_table(path, [
        {"model": "mlens", "brain_age": 50.25, "brain_age_lower": 45.0, "brain_age_upper": 55.5, "age": 48.0},
        {"model": "vgg-cbv", "brain_age": 47.0, "brain_age_lower": None, "brain_age_upper": None, "age": None},
    ])
    table = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
    assert tuple(table.columns) == BRAINAGE_COLUMNS
    assert table.loc[0, "brain_pad"] == pytest.approx(2.25)
    assert pd.isna(table.loc[1, "brain_pad"]) and "n/a" in path.read_text()
    assert set(json.loads(path.with_suffix(".json").read_text())) == set(BRAINAGE_COLUMNS)
    # what produced a row (vgg-cbv's branches and stack) goes into the sidecar, beside the columns
    provenance = {"vgg-cbv": {"Branches": "T1w", "Stack": "TS", "StackCoefficients": [1.0, 0.9, -0.2]}}
    write_brainage_table(path, [{"model": "vgg-cbv", "brain_age": 47.0, "age": 40.0}], provenance)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert set(sidecar) == set(BRAINAGE_COLUMNS) | {"ModelProvenance"}
    assert sidecar["ModelProvenance"] == provenance
    with pytest.raises(ValueError, match="unknown brainage columns"):
        write_brainage_table(path, [{"model": "x", "gap": 1}])


def test_description_validates(tiny_bids, tmp_path):
    out = tmp_path / "deriv"
    write_dataset_description(out, tiny_bids)
    write_bidsignore(out)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "brainage"
    if shutil.which("bids-validator-deno") is None:
        pytest.skip("bids-validator-deno not installed")
    proc = subprocess.run(["bids-validator-deno", "--format", "json", str(out)],
                          capture_output=True, text=True, check=False)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    assert [i for i in issues if i["severity"] == "error"] == []


def test_model_derivatives_rows_ensemble_and_maps(tmp_path):
    import nibabel as nib
    import numpy as np

    from bidsapp.derivatives import SourceEntities, write_model_derivatives

    img = tmp_path / "map.nii.gz"
    nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)).to_filename(img)
    source = SourceEntities.from_path("sub-01_ses-A_run-2_T1w.nii.gz")
    preds = [{"model": "densenet-clinical", "brain_age": 50.0, "brain_age_lower": 45.0,
              "brain_age_upper": 55.0,
              "maps": [{"file": str(img), "suffix": "relevancemap", "space": "MNI152NLin2009aSym",
                        "res": "2", "meta": {"Units": "a.u."}}]},
             {"model": "mlens", "brain_age": 40.0, "brain_age_lower": None, "brain_age_upper": None}]
    written = write_model_derivatives(tmp_path / "out", source, "sub-01/ses-A/anat/x_T1w.nii.gz",
                                      preds, age=42.0)
    anat = tmp_path / "out" / "sub-01" / "ses-A" / "anat"
    lines = (anat / "sub-01_ses-A_run-2_brainage.tsv").read_text().splitlines()
    # seed order (mlens is seed 002, densenet-clinical seed 004), then the ensemble mean
    assert [line.split("\t") for line in lines[1:]] == [
        ["mlens", "40.0000", "n/a", "n/a", "42.0000", "-2.0000"],
        ["densenet-clinical", "50.0000", "45.0000", "55.0000", "42.0000", "8.0000"],
        ["ensemble", "45.0000", "n/a", "n/a", "42.0000", "3.0000"]]
    mapped = anat / ("sub-01_ses-A_run-2_space-MNI152NLin2009aSym_res-2_desc-densenetclinical"
                     "_relevancemap.nii.gz")
    assert mapped in written and mapped.is_file()
    meta = json.loads(mapped.with_name(mapped.name.replace(".nii.gz", ".json")).read_text())
    assert meta["Units"] == "a.u." and meta["Model"] == "densenet-clinical"
    assert meta["Resolution"].startswith("2 mm")
