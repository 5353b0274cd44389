"""Simulated re-acquisitions (training.test_retest): motion, bias, noise, dataset, ICC read-back."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from training.test_retest import (global_icc, make_retest_dataset, rigid_matrix,
                                  simulate_reacquisition, voxel_icc)

AFFINE = np.array([[-2.0, 0, 0, 60], [0, 2.0, 0, -70], [0, 0, 2.5, -40], [0, 0, 0, 1]])


def _sphere(shape=(40, 44, 36), centre=(18.0, 24.0, 17.0), radius=7.0):
    grid = np.indices(shape, dtype=np.float64)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    return nib.Nifti1Image((1000.0 / (1.0 + np.exp((dist - radius) / 0.7))).astype(np.float32),
                           AFFINE)


def _world_centre_of_mass(img):
    data = np.asarray(img.dataobj, dtype=np.float64)
    com = np.array([np.sum(g * data) for g in np.indices(data.shape)]) / data.sum()
    return (img.affine @ np.append(com, 1.0))[:3]


def test_rigid_matrix_is_a_rotation_about_the_centre():
    m = rigid_matrix([3.0, -2.0, 5.0], [0, 0, 0], [10.0, -4.0, 7.0])
    rot = m[:3, :3]
    assert np.allclose(rot @ rot.T, np.eye(3)) and np.isclose(np.linalg.det(rot), 1)
    assert np.allclose(m @ [10.0, -4.0, 7.0, 1.0], [10.0, -4.0, 7.0, 1.0])


def test_no_motion_bias_or_noise_returns_the_scan():
    img = _sphere()
    out, params = simulate_reacquisition(img, np.random.default_rng(0), max_rotation_deg=0.0,
                                         max_translation_mm=0.0, bias_coeff_range=(0.0, 0.0),
                                         noise_fraction=0.0)
    assert np.allclose(out.get_fdata(), img.get_fdata(), atol=1e-3)
    assert np.array_equal(out.affine, img.affine) and params["translation_mm_xyz"] == [0.0] * 3


def test_the_head_moves_by_the_drawn_rigid_motion_in_scanner_mm():
    img = _sphere()
    out, params = simulate_reacquisition(img, np.random.default_rng(3), max_rotation_deg=4.0,
                                         max_translation_mm=3.0, bias_coeff_range=(0.0, 0.0),
                                         noise_fraction=0.0)
    data = np.asarray(img.dataobj)
    centre = img.affine @ np.append((np.asarray(data.shape) - 1) / 2.0, 1.0)
    motion = rigid_matrix(params["rotation_deg_xyz"], params["translation_mm_xyz"], centre[:3])
    expected = (motion @ np.append(_world_centre_of_mass(img), 1.0))[:3]
    moved = _world_centre_of_mass(out)
    assert np.linalg.norm(expected - _world_centre_of_mass(img)) > 1.0  # it did move
    assert np.allclose(moved, expected, atol=0.05)
    # a rigid motion keeps the amount of "tissue"
    assert np.isclose(out.get_fdata().sum(), data.sum(), rtol=0.01)


def test_bias_is_smooth_and_multiplicative_and_noise_has_the_asked_sd():
    img = _sphere()
    biased, _ = simulate_reacquisition(img, np.random.default_rng(1), max_rotation_deg=0.0,
                                       max_translation_mm=0.0, bias_coeff_range=(0.05, 0.1),
                                       noise_fraction=0.0)
    inside = img.get_fdata() > 500
    ratio = biased.get_fdata()[inside] / img.get_fdata()[inside]
    assert ratio.min() > 0.5 and ratio.max() < 2.0 and ratio.std() > 0.001
    noisy, params = simulate_reacquisition(img, np.random.default_rng(2), max_rotation_deg=0.0,
                                           max_translation_mm=0.0, bias_coeff_range=(0.0, 0.0),
                                           noise_fraction=0.02)
    p99 = np.percentile(img.get_fdata(), 99)
    assert params["noise_sd"] == pytest.approx(0.02 * p99, rel=1e-3)
    bright = img.get_fdata() > 990  # Rician ~ Gaussian where signal >> noise
    resid = noisy.get_fdata()[bright] - img.get_fdata()[bright]
    assert resid.std() == pytest.approx(0.02 * p99, rel=0.15)
    with pytest.raises(ValueError, match="3D"):
        simulate_reacquisition(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), AFFINE),
                               np.random.default_rng(0))


def _raw_dataset(root, ages):
    rows = []
    for i, age in enumerate(ages):
        pid = f"sub-{i:02d}"
        (root / pid / "anat").mkdir(parents=True)
        nib.save(_sphere(radius=5.0 + i), root / pid / "anat" / f"{pid}_T1w.nii.gz")
        rows.append({"participant_id": pid, "age": age, "sex": "F", "group": "HC"})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)


def test_dataset_has_two_sessions_of_participants_spread_over_age(tmp_path):
    _raw_dataset(tmp_path / "raw", [30.0, 70.0, 50.0, 20.0, 60.0])
    picked = make_retest_dataset(tmp_path / "raw", tmp_path / "retest", 3, seed=4,
                                 max_rotation_deg=1.0)
    assert list(picked["age"]) == [20.0, 50.0, 70.0]
    for pid in picked["participant_id"]:
        one = nib.load(tmp_path / "retest" / pid / "ses-1" / "anat" / f"{pid}_ses-1_T1w.nii.gz")
        two = nib.load(tmp_path / "retest" / pid / "ses-2" / "anat" / f"{pid}_ses-2_T1w.nii.gz")
        source = nib.load(tmp_path / "raw" / pid / "anat" / f"{pid}_T1w.nii.gz")
        assert np.array_equal(one.get_fdata(), source.get_fdata())
        assert np.array_equal(two.affine, one.affine)
        assert not np.allclose(two.get_fdata(), one.get_fdata())
    log = json.loads((tmp_path / "retest" / "sourcedata" / "reacquisition.json").read_text())
    assert sorted(log) == sorted(picked["participant_id"])
    assert max(abs(a) for p in log.values() for a in p["rotation_deg_xyz"]) <= 1.0
    assert pd.read_csv(tmp_path / "retest" / "participants.tsv", sep="\t").shape[0] == 3
    with pytest.raises(FileExistsError):
        make_retest_dataset(tmp_path / "raw", tmp_path / "retest", 3)
    with pytest.raises(ValueError, match="asked for 9"):
        make_retest_dataset(tmp_path / "raw", tmp_path / "other", 9)
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.part").exists()


def _maps(root, pid, s, data):
    anat = root / pid / f"ses-{s}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    name = f"{pid}_ses-{s}_space-MNI152NLin2009aSym_res-2_desc-localunet_brainagemap.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), anat / name)


def test_voxel_icc_reads_the_session_maps(tmp_path):
    rng = np.random.default_rng(0)
    pids = [f"sub-{i}" for i in range(6)]
    base = rng.normal(50, 10, (6, 4, 4, 3))
    base[:, 0, 0, 0] = np.nan  # outside the brain in every map
    for i, pid in enumerate(pids):
        _maps(tmp_path, pid, 1, base[i])
        _maps(tmp_path, pid, 2, base[i] + rng.normal(0, 1e-6, base[i].shape))
    result = voxel_icc(tmp_path, pids)
    assert result["n_voxels"] == 47 and result["median_icc_2_1"] == pytest.approx(1.0, abs=1e-9)
    assert result["global_icc_2_1"] == pytest.approx(1.0, abs=1e-9)
    # a second session unrelated to the first: reliability near 0
    for i, pid in enumerate(pids):
        _maps(tmp_path, pid, 2, rng.normal(50, 10, base[i].shape))
    assert abs(voxel_icc(tmp_path, pids)["median_icc_2_1"]) < 0.5
    with pytest.raises(FileNotFoundError, match="sub-9"):
        voxel_icc(tmp_path, ["sub-9"])


def test_global_icc_of_each_model_equals_pingouin(tmp_path):
    pingouin = pytest.importorskip("pingouin")
    rng = np.random.default_rng(5)
    pids = [f"sub-{i}" for i in range(8)]
    truth = rng.uniform(20, 80, len(pids))
    long = []
    for i, pid in enumerate(pids):
        for s in (1, 2):
            anat = tmp_path / pid / f"ses-{s}" / "anat"
            anat.mkdir(parents=True)
            ages = [truth[i] + rng.normal(0, 3), truth[i] + rng.normal(0, 9)]
            rows = pd.DataFrame({"model": ["mlens", "vgg-cbv"], "brain_age": ages})
            rows.loc[len(rows)] = {"model": "diffusion-ae", "brain_age": np.nan if i == 3 else 50.0}
            rows.to_csv(anat / f"{pid}_ses-{s}_brainage.tsv", sep="\t", index=False, na_rep="n/a")
            long.append({"pid": pid, "session": s, "mlens": ages[0], "vgg": ages[1]})
    result = global_icc(tmp_path, pids)
    assert sorted(result) == ["mlens", "vgg-cbv"]  # diffusion-ae: a missing value, left out
    table = pd.DataFrame(long)
    for model, column in (("mlens", "mlens"), ("vgg-cbv", "vgg")):
        ref = pingouin.intraclass_corr(table, targets="pid", raters="session", ratings=column)
        expected = float(ref.set_index("Type").loc["ICC(A,1)", "ICC"])
        assert result[model]["icc_2_1"] == pytest.approx(expected, abs=1e-10)
        assert result[model]["n"] == 8
    assert result["mlens"]["icc_2_1"] > result["vgg-cbv"]["icc_2_1"]
