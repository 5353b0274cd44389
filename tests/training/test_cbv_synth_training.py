"""Training the CBV synthesis network on paired T1w / CBV scans: pairing rules and their error,
normalisation, patch sampling, a falling loss on the synthetic pairs, exact resume and the CLI."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from bidsapp.errors import ImageError, InputMissingError, UsageError
from bidsapp.nets.cbv_synth import load_cbv_synth, synthesise_cbv
from training.cbv_synth import (CBVPair, find_cbv_pairs, load_pair, main, make_synthetic_pairs,
                                sample_patch_corners, train_cbv_synthesis)

TINY = {"channels": [4, 8, 16], "ssm_blocks": 1, "d_state": 4, "scan_paths": 2}
RUN = dict(patch=8, batch=4, lr=1e-2, seed=7, device="cpu", patches_per_scan=6, model=TINY)
MNI = "space-MNI152NLin2009aSym_res-2"


@pytest.fixture(scope="module")
def pairs_bids(tmp_path_factory):
    """4 synthetic pairs of 20^3 voxels (tiny tensors: one thread, as the other training tests)."""
    torch.set_num_threads(1)
    return make_synthetic_pairs(tmp_path_factory.mktemp("cbv") / "bids", n=4, shape=(20, 20, 20))


@pytest.fixture(scope="module")
def trained(pairs_bids, tmp_path_factory):
    """An uninterrupted 6-epoch run."""
    out = tmp_path_factory.mktemp("run-full")
    return out, train_cbv_synthesis(pairs_bids, out, epochs=6, **RUN)


def test_synthetic_pairs_share_grid_and_brain(pairs_bids):
    pairs = find_cbv_pairs(pairs_bids)
    assert [p.name for p in pairs] == [f"sub-s{i:03d}" for i in range(4)]
    t1w, cbv = (nib.load(p) for p in (pairs[0].t1w, pairs[0].cbv))
    assert np.array_equal(t1w.affine, cbv.affine) and t1w.shape == cbv.shape == (20, 20, 20)
    brain = t1w.get_fdata() != 0
    assert np.array_equal(brain, cbv.get_fdata() != 0) and 0.2 < brain.mean() < 0.5
    # same seed, same data; vessels raise the CBV far above the tissue curve (max 1 + 3)
    again = make_synthetic_pairs(pairs_bids.parent / "again", n=1, shape=(20, 20, 20))
    assert np.array_equal(nib.load(again / "sub-s000/anat/sub-s000_cbv.nii.gz").get_fdata(),
                          cbv.get_fdata())
    assert cbv.get_fdata().max() > 5


def test_the_mni_derivative_is_preferred_when_it_has_a_cbv_map(pairs_bids, tmp_path):
    derivs = tmp_path / "derivatives"
    anat = derivs / "sub-s001" / "anat"
    anat.mkdir(parents=True)
    src = pairs_bids / "sub-s001" / "anat"
    shutil.copy(src / "sub-s001_T1w.nii.gz", anat / f"sub-s001_{MNI}_desc-preproc_T1w.nii.gz")
    shutil.copy(src / "sub-s001_cbv.nii.gz", anat / f"sub-s001_{MNI}_cbv.nii.gz")
    # sub-s002 has a derivative T1w but no CBV in that space: its raw pair is used
    (derivs / "sub-s002" / "anat").mkdir(parents=True)
    shutil.copy(src / "sub-s001_T1w.nii.gz",
                derivs / "sub-s002" / "anat" / f"sub-s002_{MNI}_desc-preproc_T1w.nii.gz")
    pairs = {p.name: p for p in find_cbv_pairs(pairs_bids, [derivs])}
    assert pairs["sub-s001"] == CBVPair(anat / f"sub-s001_{MNI}_desc-preproc_T1w.nii.gz",
                                        anat / f"sub-s001_{MNI}_cbv.nii.gz")
    assert pairs["sub-s002"].t1w == pairs_bids / "sub-s002" / "anat" / "sub-s002_T1w.nii.gz"


def test_a_dataset_without_cbv_maps_is_refused_naming_what_was_looked_for(pairs_bids, tmp_path):
    bids = tmp_path / "t1w-only"
    for sub in ("sub-s000", "sub-s001"):
        (bids / sub / "ses-A" / "anat").mkdir(parents=True)
        shutil.copy(pairs_bids / sub / "anat" / f"{sub}_T1w.nii.gz",
                    bids / sub / "ses-A" / "anat" / f"{sub}_ses-A_T1w.nii.gz")
    with pytest.raises(InputMissingError, match=r"looked for sub-s000_ses-A_cbv\.nii\.gz or "
                                                r"sub-s000_ses-A_cbv\.nii .*'_T1w' replaced by '_cbv'"):
        train_cbv_synthesis(bids, tmp_path / "out", epochs=1, **RUN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputMissingError, match="no T1w image"):
        find_cbv_pairs(tmp_path / "empty")
    with pytest.raises(InputMissingError, match="does not exist"):
        find_cbv_pairs(tmp_path / "nowhere")
    assert main(["--bids", str(bids), "--out", str(tmp_path / "cli")]) == 66


def test_load_pair_normalises_by_top_percent_and_brain_median(pairs_bids, tmp_path):
    pair = find_cbv_pairs(pairs_bids)[0]
    t1w, cbv, brain = load_pair(pair)
    raw = nib.load(pair.t1w).get_fdata(dtype=np.float32)
    top = np.sort(raw[raw != 0])[-int(np.ceil(0.01 * brain.sum())):]
    np.testing.assert_allclose(t1w, raw / top.mean(), rtol=1e-6)
    assert np.median(cbv[brain]) == pytest.approx(1.0) and np.all(cbv[~brain] == 0)
    small = tmp_path / "small_cbv.nii.gz"
    nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(small)
    with pytest.raises(ImageError, match="not on the 3D grid"):
        load_pair(CBVPair(pair.t1w, small))


def test_patches_are_centred_in_the_brain():
    brain = np.zeros((20, 20, 20), bool)
    brain[12:15, 3:6, 9:11] = True
    corners = sample_patch_corners(brain, 200, 8, np.random.default_rng(0))
    centres = corners + 4
    assert corners.min() >= 0 and corners.max() <= 12
    assert brain[tuple(centres.T)].all()


def test_training_loss_decreases_and_writes_its_files(trained):
    out, result = trained
    losses = [row["train_l1"] for row in result.rows]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    with open(out / "loss.csv", encoding="utf-8") as handle:
        logged = list(csv.DictReader(handle))
    assert [float(r["train_l1"]) for r in logged] == pytest.approx(losses)
    assert {r["steps"] for r in logged} == {"6"}  # 4 pairs x 6 patches / batch 4
    state = torch.load(out / "checkpoint_latest.pt", weights_only=True)
    assert state["epoch"] == 6 and state["model_args"]["channels"] == [4, 8, 16]
    net, meta = load_cbv_synth(result.weights)
    for key, value in result.network.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    assert meta["patch"] == 8 and meta["epoch"] == 6


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(pairs_bids, trained, tmp_path):
    _, full = trained
    train_cbv_synthesis(pairs_bids, tmp_path, epochs=2, **RUN)
    with pytest.raises(UsageError, match="resume=True"):
        train_cbv_synthesis(pairs_bids, tmp_path, epochs=6, **RUN)
    with pytest.raises(UsageError, match="other settings.*lr"):
        train_cbv_synthesis(pairs_bids, tmp_path, epochs=6, resume=True, **{**RUN, "lr": 1e-3})
    resumed = train_cbv_synthesis(pairs_bids, tmp_path, epochs=6, resume=True, **RUN)
    assert [r["train_l1"] for r in resumed.rows] == [r["train_l1"] for r in full.rows]
    full_state = full.network.state_dict()
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, full_state[key]), key


def test_cli_with_the_shipped_config_trains_and_the_weights_synthesise(pairs_bids, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "training" / "configs" / "cbv-synth-cpu.toml"
    out = tmp_path / "cli"
    code = main(["--config", str(config), "--bids", str(pairs_bids), "--out", str(out),
                 "--epochs", "1", "--patch", "8", "--channels", "4,8,16", "--ssm-blocks", "1",
                 "--d-state", "4", "--patches-per-scan", "2", "--device", "cpu"])
    assert code == 0
    net, meta = load_cbv_synth(out / "cbv_synth.pt")
    assert meta["batch"] == 4 and meta["seed"] == 0 and net.init_args["scan_paths"] == 2
    t1w = nib.load(pairs_bids / "sub-s000" / "anat" / "sub-s000_T1w.nii.gz").get_fdata(dtype=np.float32)
    cbv = synthesise_cbv(net, t1w, meta["patch"])
    assert cbv.shape == t1w.shape and np.all(cbv[t1w == 0] == 0)
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 1\nlearning_rate = 0.1\n")
    assert main(["--config", str(bad), "--bids", str(pairs_bids), "--out", str(out)]) == 64
