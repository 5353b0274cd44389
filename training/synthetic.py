"""A small synthetic BIDS dataset with ``brainage``-style derivatives and a planted age effect.

For tests and demonstrations of the training engine without real scans: each "brain" is a
bright ellipsoid whose size shrinks and whose dark central "ventricles" grow with age, so a
model can learn age from the image and a broken pipeline cannot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["synthetic_brain", "make_synthetic_dataset"]


def synthetic_brain(age: float, shape: Sequence[int] = (32, 40, 32), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """T1w-like volume and brain mask of an age (years, 20-90 is the useful range).

    Returns
    -------
    (ndarray, ndarray)
        float32 image (head with background noise) and uint8 brain mask.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2 + rng.normal(0, 1.0, 3)
    rel = (age - 20.0) / 70.0
    brain_r = np.array(shape) * (0.36 - 0.05 * rel)
    vent_r = np.array(shape) * (0.05 + 0.10 * rel)
    head_r = np.array(shape) * 0.46

    def inside(radius):
        return (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1

    brain, vent, head = inside(brain_r), inside(vent_r), inside(head_r)
    image = np.where(head, 150.0, 5.0) + rng.normal(0, 8, shape)
    image[brain] = 500 + rng.normal(0, 20, int(brain.sum()))
    image[vent] = 180 + rng.normal(0, 10, int(vent.sum()))
    return np.clip(image, 0, None).astype(np.float32), brain.astype(np.uint8)


def make_synthetic_dataset(root: str | Path, ages: Sequence[float], *, shape: Sequence[int] = (32, 40, 32),
                           zooms: Sequence[float] = (2.0, 2.0, 2.0), seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/bids`` (raw) and ``root/derivatives`` (preproc T1w + brain mask).

    Parameters
    ----------
    root : path
        Output folder (created).
    ages : sequence of float
        One participant per age (labels ``s000``, ``s001`` ...).
    shape, zooms : sequence
        Image grid (RAS, voxel sizes in mm).
    seed : int

    Returns
    -------
    (Path, Path)
        The BIDS root and the derivatives root.
    """
    import nibabel as nib

    from bidsapp.derivatives import SourceEntities, derivative_path

    root = Path(root)
    bids, derivs = root / "bids", root / "derivatives"
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic brains", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (bids / "README").write_text("Synthetic brains with a planted age effect.\n")
    (bids / "participants.json").write_text(json.dumps(
        {"age": {"Description": "age at scan", "Units": "year"}, "sex": {"Description": "sex"}}))
    rows = ["participant_id\tage\tsex"]
    affine = np.diag([*map(float, zooms), 1.0])
    affine[:3, 3] = -np.array(shape) * np.array(zooms) / 2
    for i, age in enumerate(ages):
        label = f"s{i:03d}"
        rows.append(f"sub-{label}\t{age:.2f}\t{'FM'[i % 2]}")
        image, mask = synthetic_brain(age, shape, seed=seed * 10007 + i)
        raw = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        raw.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(image, affine).to_filename(raw)
        source = SourceEntities(subject=label)
        t1w = derivative_path(derivs, source, desc="preproc", suffix="T1w")
        t1w.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(image, affine).to_filename(t1w)
        nib.Nifti1Image(mask, affine).to_filename(derivative_path(derivs, source, desc="brain",
                                                                  suffix="mask"))
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    return bids, derivs
