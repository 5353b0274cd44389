"""Tests for the synthetic demo dataset builder (:mod:`bidsapp.demo`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from bidsapp import demo

N_SUBJECTS = 8
SEED = 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One 8-participant demo dataset shared by the read-only tests."""
    out = tmp_path_factory.mktemp("demo") / "bids"
    return demo.build_demo_dataset(out, n_subjects=N_SUBJECTS, random_seed=SEED)


@pytest.fixture(scope="module")
def cohort():
    """The simulation parameters behind ``dataset`` (same seed and size)."""
    return {f"sub-{s.label}": s for s in demo._draw_cohort(N_SUBJECTS, 0.5, SEED)}


def _read_tsv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _ball_points(centres, radius, step=1.0):
    grid = np.arange(-radius, radius + step / 2, step)
    x, y, z = np.meshgrid(grid, grid, grid, indexing="ij")
    inside = x**2 + y**2 + z**2 <= radius**2
    offsets = np.stack([x[inside], y[inside], z[inside]], axis=1)
    return np.concatenate([offsets + np.asarray(c) for c in centres]).astype(np.float32)


def _no_warp():
    """An all-zero individual warp, to look at the atrophy fields alone."""
    affine = np.diag([500.0, 500.0, 500.0, 1.0])
    affine[:3, 3] = -250.0
    return demo._Volume(torch.zeros(1, 3, 2, 2, 2), affine)


def _subject(age, severity):
    base = demo._draw_cohort(1, 0.0, 0)[0]
    return dataclasses.replace(base, age=float(age), severity=float(severity))


# ------------------------------------------------------------------------------------------
# files and tables
# ------------------------------------------------------------------------------------------
def test_participants_table(dataset):
    rows = _read_tsv(dataset / "participants.tsv")
    assert list(rows[0]) == ["participant_id", "age", "sex", "group", "site"]
    assert [r["participant_id"] for r in rows] == [f"sub-{i:02d}" for i in range(1, N_SUBJECTS + 1)]
    ages = np.array([float(r["age"]) for r in rows])
    assert ages.min() >= 20 and ages.max() <= 80
    # jittered grid: one age per 7.5-year stratum
    assert sorted(np.floor((ages - 20) / 7.5).astype(int)) == list(range(N_SUBJECTS))
    groups = np.array([r["group"] for r in rows])
    sexes = np.array([r["sex"] for r in rows])
    assert (groups == "PT").sum() == 4 and (groups == "HC").sum() == 4
    for group in ("PT", "HC"):
        assert sorted(sexes[groups == group]) == ["F", "F", "M", "M"]
    # one patient per pair of consecutive ages: group is not confounded with age
    by_age = groups[np.argsort(ages)]
    assert all(sorted(by_age[i : i + 2]) == ["HC", "PT"] for i in range(0, N_SUBJECTS, 2))
    assert {r["site"] for r in rows} == {"SYN"}

    sidecar = json.loads((dataset / "participants.json").read_text())
    assert sidecar["age"]["Units"] == "year"
    assert set(sidecar["sex"]["Levels"]) == {"M", "F"}
    assert set(sidecar["group"]["Levels"]) == {"HC", "PT"}
    assert sidecar["group"]["Levels"]["HC"] == "healthy control"


def test_description_and_readme(dataset):
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert "synthetic" in description["Name"].lower()
    assert description["License"] == "CC0"
    assert description["DatasetType"] == "raw"
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == "brainage-demo"
    assert "random_seed=0" in generated["Description"]
    readme = " ".join((dataset / "README").read_text().split())  # ignore line wrapping
    assert " ".join(demo.DEMO_DESCRIPTION.split()) in readme
    assert "(-25, -20, -15) and (+25, -20, -15)" in readme
    assert "15 mm ball" in readme
    assert "MNI152NLin2009aSym" in readme and "skull-stripped" in readme


def test_images_and_sidecars(dataset, cohort):
    for label, subject in cohort.items():
        anat = dataset / label / "anat"
        expected = [f"{label}_T1w.json", f"{label}_T1w.nii.gz"]
        assert sorted(p.name for p in anat.iterdir()) == expected
        sidecar = json.loads((anat / f"{label}_T1w.json").read_text())
        assert "synthetic" in sidecar["SeriesDescription"]
        img = nib.load(anat / f"{label}_T1w.nii.gz")
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.header.get_zooms(), 2.0)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        data = np.asarray(img.dataobj, dtype=np.float32)
        wm = np.percentile(data, 99)
        # the brain never reaches the edge of the field of view: faces hold only noise
        faces = [data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1]]
        assert max(f.max() for f in faces) < 0.3 * wm
        assert data.min() >= 0


def test_orientation_is_not_ras(dataset, cohort):
    codes = {
        nib.aff2axcodes(nib.load(dataset / s / "anat" / f"{s}_T1w.nii.gz").affine) for s in cohort
    }
    assert ("R", "A", "S") not in codes
    assert codes == {("P", "S", "R"), ("L", "A", "S"), ("L", "P", "S")}


def test_simulation_parameters_table(dataset, cohort):
    truth = dataset / "sourcedata" / "brainage-demo"
    rows = _read_tsv(truth / "simulation_parameters.tsv")
    params = json.loads((truth / "simulation_parameters.json").read_text())
    assert list(rows[0])[1:] == list(params)
    for row in rows:
        subject = cohort[row["participant_id"]]
        assert float(row["atrophy_severity"]) == pytest.approx(subject.severity, abs=1e-3)
        assert (float(row["atrophy_severity"]) > 0) == (subject.group == "PT")
        assert row["voxel_order"] == "".join(subject.orientation)
        assert all(abs(float(row[f"rotation_{a}_deg"])) <= 10 for a in "xyz")


@pytest.mark.skipif(
    shutil.which("bids-validator-deno") is None, reason="bids-validator-deno is not installed"
)
def test_bids_validator_passes(dataset):
    result = subprocess.run(
        ["bids-validator-deno", "--format", "json", str(dataset)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == []
    assert result.returncode == 0
    assert len(report["summary"]["subjects"]) == N_SUBJECTS


# ------------------------------------------------------------------------------------------
# arguments, determinism, overwrite
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"n_subjects": 0}, ValueError, "n_subjects"),
        ({"n_subjects": 2.5}, TypeError, "n_subjects"),
        ({"n_subjects": True}, TypeError, "n_subjects"),
        ({"patient_fraction": 1.5}, ValueError, "patient_fraction"),
        ({"patient_fraction": "half"}, TypeError, "patient_fraction"),
        ({"voxel_size_mm": 0.5}, ValueError, "voxel_size_mm"),
        ({"random_seed": -1}, ValueError, "random_seed"),
        ({"overwrite": "yes"}, TypeError, "overwrite"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, error, name):
    with pytest.raises(error, match=name):
        demo.build_demo_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_out_dir_type_and_file(tmp_path):
    with pytest.raises(TypeError, match="out_dir"):
        demo.build_demo_dataset(3)
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        demo.build_demo_dataset(target)


def test_deterministic_for_a_seed(tmp_path):
    first = demo.build_demo_dataset(tmp_path / "a", n_subjects=2, random_seed=7)
    second = demo.build_demo_dataset(tmp_path / "b", n_subjects=2, random_seed=7)
    other = demo.build_demo_dataset(tmp_path / "c", n_subjects=2, random_seed=8)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    image = "sub-01/anat/sub-01_T1w.nii.gz"
    assert not np.array_equal(nib.load(first / image).dataobj, nib.load(other / image).dataobj)
    assert (first / "participants.tsv").read_text() != (other / "participants.tsv").read_text()


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path):
    root = demo.build_demo_dataset(tmp_path / "bids", n_subjects=3, random_seed=1)
    (root / "derivatives").mkdir()
    (root / "derivatives" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="out_dir"):
        demo.build_demo_dataset(root, n_subjects=2, random_seed=1)
    again = demo.build_demo_dataset(root, n_subjects=2, random_seed=1, overwrite=True)
    assert again == root
    assert sorted(p.name for p in root.glob("sub-*")) == ["sub-01", "sub-02"]
    assert len(_read_tsv(root / "participants.tsv")) == 2
    assert (root / "derivatives" / "keep.txt").read_text() == "mine"
    # a build cut short (no participants.tsv yet) is still recognised and can be replaced
    (root / "participants.tsv").unlink()
    (root / "README").unlink()
    with pytest.raises(ValueError, match="overwrite=True"):
        demo.build_demo_dataset(root, n_subjects=2, random_seed=1)
    demo.build_demo_dataset(root, n_subjects=2, random_seed=1, overwrite=True)
    assert len(_read_tsv(root / "participants.tsv")) == 2
    # a directory this builder did not write is never cleared, even with overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.nii").write_text("precious")
    with pytest.raises(ValueError, match="out_dir"):
        demo.build_demo_dataset(foreign, n_subjects=2, overwrite=True)
    assert (foreign / "data.nii").read_text() == "precious"


# ------------------------------------------------------------------------------------------
# the simulated effects
# ------------------------------------------------------------------------------------------
def test_planted_atrophy_lowers_tissue_in_pt_images(dataset, cohort):
    """Image-level check: map each written image back to its anatomy with the known head
    position and count CSF-dark voxels inside the planted balls."""
    bases = demo._deformation_bases()
    planted = _ball_points(
        demo.PLANTED_ATROPHY_CENTRES_MM, demo.PLANTED_ATROPHY_RADIUS_MM, step=2.0
    )
    dark = {}
    for label, subject in cohort.items():
        img = nib.load(dataset / label / "anat" / f"{label}_T1w.nii.gz")
        data = np.asarray(img.dataobj, dtype=np.float32)
        anatomy_to_scanner = np.linalg.inv(demo._scanner_to_anatomy(subject, bases))
        to_voxel = np.linalg.inv(img.affine) @ anatomy_to_scanner
        coords = planted @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        values = ndi.map_coordinates(data, coords.T, order=1)
        bright = np.percentile(data[data > np.percentile(data, 50)], 90)  # ~ white matter
        dark[label] = float((values < 0.5 * bright).mean())  # CSF-dark share of the balls
    pt = [dark[k] for k, s in cohort.items() if s.group == "PT"]
    hc = [dark[k] for k, s in cohort.items() if s.group == "HC"]
    assert np.mean(pt) > 2.0 * np.mean(hc)
    assert np.mean(pt) - np.mean(hc) > 0.01
    assert min(pt) > min(hc)


def test_planted_atrophy_size():
    """Known-transform check: the GM+WM of the template balls that survives in the subject
    (Jacobian-modulated, counted through the pull-back) drops by ~20 % at severity 1."""
    bases = demo._deformation_bases()
    tissue = demo._template_images(1.0)
    radius = demo.PLANTED_ATROPHY_RADIUS_MM
    centres = np.asarray(demo.PLANTED_ATROPHY_CENTRES_MM)
    # subject-space points covering everything that can map into the template balls
    region = torch.from_numpy(_ball_points(centres, 1.6 * radius, step=1.0))

    def surviving(severity):
        template = demo._pull_back(_subject(50, severity), bases, _no_warp(), region)
        near = np.min(np.linalg.norm(template.numpy()[:, None] - centres[None], axis=2), axis=1)
        return float(tissue.sample(template)[:, 1].numpy()[near <= radius].sum())

    healthy = surviving(0.0)
    loss = {severity: 1.0 - surviving(severity) / healthy for severity in (0.8, 1.0, 1.2)}
    assert 0.15 <= loss[1.0] <= 0.25, loss
    assert 0.12 <= loss[0.8] < loss[1.0] < loss[1.2] <= 0.3, loss


def test_planted_atrophy_is_local():
    """PT and HC of the same age differ in local volume only near the planted centres."""
    bases = demo._deformation_bases()
    bounds = ((-70, 71), (-80, 41), (-60, 41))
    axes = [np.arange(lo, hi, 2.0, dtype=np.float32) for lo, hi in bounds]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    centres = np.asarray(demo.PLANTED_ATROPHY_CENTRES_MM)
    distance = np.min(np.linalg.norm(grid[..., None, :] - centres, axis=-1), axis=-1)

    def pull_back_and_det(severity):
        flat = torch.from_numpy(grid.reshape(-1, 3))
        pulled = demo._pull_back(_subject(50, severity), bases, _no_warp(), flat)
        pulled = pulled.numpy().reshape(grid.shape)
        jac = np.stack(
            [np.stack(np.gradient(pulled[..., i], 2.0), axis=-1) for i in range(3)], axis=-2
        )
        return pulled, np.linalg.det(jac)

    healthy, det_hc = pull_back_and_det(0.0)
    patient, det_pt = pull_back_and_det(1.2)
    # subject/template volume ratio of PT over HC (pull-back determinants are inverse volumes)
    relative = det_hc / det_pt
    assert np.median(relative[distance < 12]) < 0.85
    assert np.abs(relative[distance > 25] - 1).max() < 0.05
    moved = np.linalg.norm(patient - healthy, axis=-1)
    assert moved[distance < 20].max() > 1.0
    assert moved[distance > 40].max() < 0.25


def test_no_folding_in_the_most_extreme_subject():
    bases = demo._deformation_bases()
    bounds = ((-50, 50), (-50, 30), (-40, 40))  # medial temporal lobes and ventricles
    axes = [np.arange(lo, hi, 1.0, dtype=np.float32) for lo, hi in bounds]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    flat = torch.from_numpy(grid.reshape(-1, 3))
    pulled = demo._pull_back(_subject(80, 1.2), bases, _no_warp(), flat)
    pulled = pulled.numpy().reshape(grid.shape)
    jac = np.stack([np.stack(np.gradient(pulled[..., i]), axis=-1) for i in range(3)], axis=-2)
    det = np.linalg.det(jac)
    assert det.min() > 0.01
    assert det.max() > 1.2 and det.min() < 0.5  # the fields do act here


def test_ageing_shrinks_brain_and_grows_ventricles():
    """Known answer: GM+WM volume falls by 0.2-0.5 %/year, faster when older; ventricles grow."""
    bases = demo._deformation_bases()
    tpl = bases.template
    tissue = demo._template_images(2.0)
    mask = torch.from_numpy(tpl.ventricles.astype(np.float32))[None, None]
    ventricles = demo._Volume(mask, tpl.affine)
    idx = np.argwhere(tpl.reach)
    axes = [
        np.arange(lo, hi + 1, 2.0, dtype=np.float32) + np.float32(tpl.affine[a, 3])
        for a, (lo, hi) in enumerate(zip(idx.min(0), idx.max(0)))
    ]
    points = torch.from_numpy(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3))
    volume, vent = {}, {}
    for age in (20, 40, 60, 80):
        template = demo._pull_back(_subject(age, 0.0), bases, _no_warp(), points)
        volume[age] = float(tissue.sample(template)[:, 1].sum()) * 8e-3
        vent[age] = float(ventricles.sample(template).sum()) * 8e-3
    rates = [100 * (1 - (volume[a + 20] / volume[a]) ** (1 / 20)) for a in (20, 40, 60)]
    assert all(0.2 <= r <= 0.5 for r in rates), rates
    assert rates[0] < rates[1] < rates[2]
    assert volume[20] == pytest.approx(float(tpl.tissue.sum()) * 1e-3, rel=0.02)
    assert vent[80] > 1.5 * vent[20]
    assert vent[20] < vent[40] < vent[60] < vent[80]


def test_older_participants_have_smaller_brains(dataset, cohort):
    rows = {r["participant_id"]: r for r in _read_tsv(dataset / "participants.tsv")}
    truth = _read_tsv(dataset / "sourcedata" / "brainage-demo" / "simulation_parameters.tsv")
    ages, true_volume, image_volume = [], [], []
    for row in truth:
        subject = cohort[row["participant_id"]]
        head = float(np.prod(subject.scale))
        ages.append(float(rows[row["participant_id"]]["age"]))
        true_volume.append(float(row["brain_tissue_volume_ml"]) / head)
        label = row["participant_id"]
        img = nib.load(dataset / label / "anat" / f"{label}_T1w.nii.gz")
        data = np.asarray(img.dataobj, dtype=np.float32)
        bright = np.percentile(data[data > np.percentile(data, 50)], 90)
        # tissue-bright voxels (GM and WM, not CSF or background), head-size corrected
        image_volume.append((data > 0.5 * bright).sum() * 8e-3 / head)
    ages = np.array(ages)
    assert np.corrcoef(ages, true_volume)[0, 1] < -0.9
    assert np.corrcoef(ages, image_volume)[0, 1] < -0.8
    slope = np.polyfit(ages, image_volume, 1)[0] / np.mean(image_volume)
    assert -0.006 < slope < -0.0015  # 0.15-0.6 % of brain volume per year, as planted
