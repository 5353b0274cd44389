"""Reliability, end to end: two ``brainage`` processes write different participants into one
output directory at once, each with an unusual but usable T1w that must be processed and flagged.

* sub-01, a child (72 months, ``Units: months`` in its scans.json) scanned with an oblique
  (15 degree) acquisition, a header whose qform and sform disagree, float64 intensities beyond
  float32 (1e40) and a few NaN voxels; the installed model was trained on 20-80 year olds.
* sub-02: thick slices (3 x 3 x 6 mm), uint16 voxels, and no age anywhere (participants.tsv
  has no ``age`` column).

Both images come from the demo generator (3 mm, brain only, so the skull-stripped-input path
runs as well).  About five minutes on two busy cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from reliability_cases import write_densenet_card

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _child_with_odd_header(t1w: Path) -> None:
    img = nib.load(t1w)
    data = np.asarray(img.dataobj, dtype=np.float64) * 1e40
    data[:6, :6, :6] = np.nan
    angle = np.deg2rad(15.0)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    sform = rotation @ img.affine
    qform = sform.copy()
    qform[:3, 3] += [0.0, 4.0, 0.0]
    out = nib.Nifti1Image(data, sform)
    out.set_qform(qform, code=1)
    out.set_sform(sform, code=2)
    out.to_filename(t1w)
    (t1w.parents[1] / "sub-01_scans.tsv").write_text("filename\tage\nanat/sub-01_T1w.nii.gz\t72\n")
    (t1w.parents[1] / "sub-01_scans.json").write_text(json.dumps({"age": {"Units": "months"}}))


def _thick_slices_uint16(t1w: Path) -> None:
    img = nib.load(t1w)
    axis = int(np.argmax(np.abs(img.affine[2, :3])))  # the voxel axis closest to superior
    data = np.take(np.asarray(img.dataobj), np.arange(0, img.shape[axis], 2), axis=axis)
    affine = img.affine.copy()
    affine[:3, axis] *= 2
    nib.Nifti1Image(np.clip(data, 0, None).astype(np.uint16), affine).to_filename(t1w)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from bidsapp.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("concurrent")
    bids = build_demo_dataset(root / "ds", n_subjects=2, voxel_size_mm=3.0, random_seed=3)
    _child_with_odd_header(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _thick_slices_uint16(bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    (bids / "participants.tsv").write_text("participant_id\tsex\tgroup\nsub-01\tF\tHC\nsub-02\tM\tPT\n")
    participants_json = json.loads((bids / "participants.json").read_text())
    participants_json.pop("age")
    (bids / "participants.json").write_text(json.dumps(participants_json))
    models = root / "models"
    write_densenet_card(models, age_range=(20.0, 80.0))
    out = root / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BRAINAGE_MODELS_DIR": str(models),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {label: subprocess.Popen(
        [sys.executable, "-m", "bidsapp.cli.run", str(bids), str(out), "participant",
         "--participant-label", label, "-w", str(root / f"work-{label}"), "--nprocs", "1",
         "--omp-nthreads", "1", "--skip-bids-validation"],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for label in ("01", "02")}
    results = {}
    for label, proc in procs.items():
        _, err = proc.communicate(timeout=1800)
        results[label] = (proc.returncode, err)
    return out, results


def _qc(out, label):
    return json.loads((out / f"sub-{label}" / "anat" / f"sub-{label}_qc.json").read_text())


def _table(out, label):
    lines = (out / f"sub-{label}" / "anat" / f"sub-{label}_brainage.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_both_processes_succeed_and_nothing_is_half_written(run):
    out, results = run
    for label, (code, err) in results.items():
        assert code == 0, f"sub-{label}: {err}"
        assert "Traceback" not in err
    assert list(out.rglob("*.part")) == [] and list(out.rglob(".*.part")) == []
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "brainage"
    assert len(list((out / "logs").glob("config-*.json"))) == 2
    for label in ("01", "02"):
        assert (out / f"sub-{label}.html").is_file()
        assert (out / f"sub-{label}" / "anat" / f"sub-{label}_desc-preproc_T1w.nii.gz").is_file()
        assert _qc(out, label)["source"] == f"sub-{label}/anat/sub-{label}_T1w.nii.gz"


def test_child_is_predicted_and_flagged_out_of_the_training_range(run):
    out, results = run
    row = next(r for r in _table(out, "01") if r["model"] == "densenet-clinical")
    assert float(row["age"]) == pytest.approx(6.0) and row["brain_age"] != "n/a"
    assert float(row["brain_pad"]) == pytest.approx(float(row["brain_age"]) - 6.0, abs=1e-3)
    message = "age 6.0 y is outside the ages densenet-clinical was trained on (20-80 y)"
    assert any(message in w for w in _qc(out, "01")["scan_info"]["warnings"])
    assert message in results["01"][1]


def test_odd_header_and_intensities_are_handled_and_reported(run):
    out, _ = run
    qc = _qc(out, "01")
    assert qc["flags"]["oblique"] and qc["input"]["obliquity_deg"] == pytest.approx(15.0, abs=0.01)
    assert qc["flags"]["skull_stripped_input"]
    assert qc["input"]["nonfinite_voxels"] == 216
    warnings = " | ".join(qc["warnings"])
    for text in ("qform and sform of the header disagree by up to 4.0 mm", "were divided by 1e",
                 "216 NaN/Inf voxels were set to 0"):
        assert text in warnings
    # the output lies where the sform puts the input (the qform is 4 mm off)
    raw = nib.load(out.parent / "ds" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    preproc = nib.load(out / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz")
    np.testing.assert_allclose(_corners(preproc.affine, preproc.shape),
                               _corners(raw.header.get_sform(), raw.shape), atol=1e-3)
    assert 500 < qc["mask_volume_ml"] < 2500


def _corners(affine, shape):
    """World coordinates of the 8 corner voxels, sorted (independent of the voxel order)."""
    ijk = np.array(np.meshgrid(*[(0, n - 1) for n in shape[:3]], indexing="ij")).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:]).T
    return xyz[np.lexsort(xyz.T[::-1])]


def test_thick_slices_without_age_are_processed_and_flagged(run):
    out, results = run
    qc = _qc(out, "02")
    assert qc["flags"]["thick_slice"] and qc["flags"]["anisotropic"]
    assert sorted(qc["input"]["voxel_size_mm"]) == [3.0, 3.0, 6.0]
    assert qc["scan_info"]["age"] is None
    assert any("no age found" in w for w in qc["scan_info"]["warnings"])
    row = next(r for r in _table(out, "02") if r["model"] == "densenet-clinical")
    assert row["age"] == "n/a" and row["brain_pad"] == "n/a" and row["brain_age"] != "n/a"
    assert "no age found" in results["02"][1]
