"""Shared fixtures: seeded RNG, tiny synthetic BIDS datasets, and the real data beside the repo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# re-exported for the fixtures below; tests import them from synthetic_images, never from
# 'conftest' (several conftest.py files share that module name)
from synthetic_images import blob_t1w, write_image  # noqa: E402,F401


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$BRAINAGE_SHARED_DATA``."""
    return Path(os.environ.get("BRAINAGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture(scope="session")
def ixi_dir() -> Path:
    path = shared_data_dir() / "ixi-hh"
    if not (path / "participants.tsv").is_file():
        pytest.skip(f"real IXI data not found at {path} (set BRAINAGE_SHARED_DATA or place "
                    "../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def pediatric_dir() -> Path:
    path = shared_data_dir() / "pediatric"
    if not (path / "dataset_description.json").is_file():
        pytest.skip(f"real pediatric data not found at {path}")
    return path


@pytest.fixture
def tiny_bids(tmp_path) -> Path:
    """A valid minimal BIDS dataset: two subjects, one with two sessions, ages in tables."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "tiny", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (root / "README").write_text("A tiny synthetic dataset for tests.\n")
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\nsub-01\t34.5\tF\tHC\nsub-02\t89+\tM\tPT\n")
    (root / "participants.json").write_text(json.dumps(
        {"age": {"Description": "age", "Units": "year"}, "sex": {"Description": "sex"},
         "group": {"Description": "group"}}))
    write_image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", blob_t1w(seed=1))
    for ses in ("A", "B"):
        write_image(root / "sub-02" / f"ses-{ses}" / "anat" / f"sub-02_ses-{ses}_T1w.nii.gz",
                    blob_t1w(seed=2))
    (root / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage_months\nses-A\t30\nses-B\tn/a\n")
    return root


@pytest.fixture(scope="session")
def tiny_vgg_cbv(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny vgg-cbv model trained and exported by the training engine (once per session):
    ``(models_dir, derivs)``, see ``vgg_cbv_models.export_tiny_vgg_cbv``."""
    from vgg_cbv_models import export_tiny_vgg_cbv

    return export_tiny_vgg_cbv(tmp_path_factory.mktemp("vgg-cbv"))


@pytest.fixture(scope="session")
def tiny_diffusion_ae(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny diffusion-ae model trained and exported by the training engine (once per
    session): ``(models_dir, derivs)``, see ``diffusion_ae_models.export_tiny_diffusion_ae``."""
    from diffusion_ae_models import export_tiny_diffusion_ae

    return export_tiny_diffusion_ae(tmp_path_factory.mktemp("diffusion-ae"))


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Run each test in its own folder so defaults such as ./work never land in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module of small networks: they gain nothing from more, and on
    a busy machine extra threads wait on each other (a DDIM loop took 27 s on two threads, 1 s on
    one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
