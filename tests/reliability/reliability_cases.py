"""Builders for the reliability catalogue: one tiny BIDS dataset per case, the CLI run in-process,
the check that a refused run left nothing half-written, and a tiny installable model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest


def _top_conftest():
    # tests/conftest.py holds the synthetic-image helpers; pytest imports every conftest as
    # "conftest", so load it under a name of its own
    spec = importlib.util.spec_from_file_location(
        "brainage_tests_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _top_conftest()
blob_t1w, write_image = _helpers.blob_t1w, _helpers.write_image

T1W = "sub-01/anat/sub-01_T1w.nii.gz"


def make_dataset(root: Path, *, participants: str | None = "participant_id\tage\nsub-01\t30\n",
                 participants_json: dict | None = None, image: np.ndarray | None = None,
                 zooms=(2.0, 2.0, 2.0)) -> Path:
    """A valid one-participant BIDS dataset (``sub-01``, one 40x48x40 T1w) to break one way."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "reliability case", "BIDSVersion": "1.10.0", "DatasetType": "raw"}))
    (root / "README").write_text("One synthetic participant for a reliability test.\n")
    if participants is not None:
        (root / "participants.tsv").write_text(participants)
    if participants_json is not None:
        (root / "participants.json").write_text(json.dumps(participants_json))
    write_image(root / T1W, blob_t1w() if image is None else image, zooms=zooms)
    return root


def run_brainage(capsys, bids_dir, out, *extra, validate=False, work=None):
    """``brainage bids_dir out participant …`` in-process: (exit code, stderr)."""
    from bidsapp.cli.run import main

    argv = [str(bids_dir), str(out), "participant", "--nprocs", "1", "--models", "none",
            "-w", str(work or Path(out).parent / "work")]
    if not validate:
        argv.append("--skip-bids-validation")
    code = main(argv + [str(a) for a in extra])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The single ERROR record of a refused run (tracebacks and second errors fail the test)."""
    errors = [line for line in err.splitlines() if "| ERROR" in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def assert_nothing_written(out: Path) -> None:
    """A refused run leaves nothing in ``output_dir``: no derivative, no
    dataset_description.json, no run record, no temporary ``.part`` file, not even the folder."""
    if not out.exists():
        return
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [], f"a refused run left {left}"


def permissions_ignored(folder: Path) -> bool:
    """True where a read-only directory can still be written (root with CAP_DAC_OVERRIDE)."""
    probe = folder / "permission-probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("")
    except PermissionError:
        return False
    finally:
        probe.chmod(0o755)
    return True


def skip_unless_permissions_enforced(folder: Path) -> None:
    if os.geteuid() == 0 and permissions_ignored(folder):
        pytest.skip("running as root: file permissions are not enforced, so a read-only "
                    "directory is still writable (run the suite as a normal user)")


def write_densenet_card(folder: Path, *, age_range=(20.0, 80.0), folds: int = 2) -> Path:
    """A tiny densenet-clinical model (4 mm input) with its card, as a site would install one
    under ``BRAINAGE_MODELS_DIR`` (``densenet-clinical/model_card.json`` next to its weights);
    returns the first weights file."""
    import torch

    from bidsapp.inference.weights import sha256_file
    from bidsapp.nets import DenseNetRegressor
    from bidsapp.transforms import ClinicalInputSpec

    arch = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "init_features": 4,
            "growth_rate": 4, "block_config": [2, 2]}
    (folder / "densenet-clinical").mkdir(parents=True)
    weights = []
    for fold in range(folds):
        torch.manual_seed(fold)
        net = DenseNetRegressor(**{**arch, "block_config": (2, 2)})
        net.set_target_scaling(50.0 + fold, 15.0)
        path = folder / "densenet-clinical" / f"fold{fold}.pt"
        torch.save(net.state_dict(), path)
        weights.append({"fold": fold, "file": path.name, "sha256": sha256_file(path)})
    card = {"id": "densenet-clinical", "family": "densenet-clinical", "variant": "reliability-test",
            "architecture": {"params": arch},
            "input": {"params": ClinicalInputSpec(spacing_mm=4.0, shape=(14, 16, 10)).to_dict()},
            "weights": weights,
            "training_data": {"age_min": age_range[0], "age_max": age_range[1]}}
    (folder / "densenet-clinical" / "model_card.json").write_text(json.dumps(card))
    return folder / "densenet-clinical" / weights[0]["file"]
