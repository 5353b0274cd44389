"""Synthetic derivatives, laid out as the participant workflow writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
from nilearn import datasets

from bidsapp.derivatives import TEMPLATE_SPACE, SourceEntities, derivative_path

# Voxel size and grid of the synthetic native images: coarse so figures render quickly.
ZOOM = 4.0
SHAPE = (36, 44, 38)


def synthetic_head(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1w-like intensities, a dseg (1 GM, 2 WM, 3 CSF) and the brain mask, on SHAPE."""
    grid = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    radius = np.array(SHAPE) * 0.38
    r = np.sqrt((((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0))
    vradius = radius * np.array([0.12, 0.3, 0.15])
    ventricles = ((((grid - centre[:, None, None, None]) / vradius[:, None, None, None]) ** 2)
                  .sum(0)) <= 1
    dseg = np.zeros(SHAPE, np.uint8)
    dseg[r <= 0.95] = 3          # outer CSF
    dseg[r <= 0.85] = 1          # cortex
    dseg[r <= 0.6] = 2           # white matter
    dseg[ventricles] = 3
    t1w = np.choose(dseg, [0.0, 700.0, 1000.0, 300.0]).astype(np.float32)
    t1w[(r > 1.0) & (r <= 1.15)] = 800.0  # scalp, outside the mask
    t1w += np.random.default_rng(seed).normal(0, 20, SHAPE).astype(np.float32)
    t1w[r > 1.2] = 0.0
    return t1w, dseg, (dseg > 0).astype(np.uint8)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def native_affine() -> np.ndarray:
    affine = np.diag([ZOOM, ZOOM, ZOOM, 1.0])
    affine[:3, 3] = -ZOOM * (np.array(SHAPE) - 1) / 2
    return affine


def write_unit(output_dir: Path, source: SourceEntities, *, qc: Mapping[str, Any] | None,
               parts: tuple[str, ...] = ("native", "mni"), seed: int = 0) -> None:
    """Write the derivatives of one T1w unit (``parts`` selects which groups exist)."""
    affine = native_affine()
    t1w, dseg, mask = synthetic_head(seed)
    if "native" in parts or "preproc" in parts:
        _save(derivative_path(output_dir, source, suffix="T1w", desc="preproc"), t1w, affine)
    if "native" in parts:
        _save(derivative_path(output_dir, source, suffix="mask", desc="brain"), mask, affine)
        _save(derivative_path(output_dir, source, suffix="dseg"), dseg, affine)
        for value, label in ((1, "GM"), (2, "WM"), (3, "CSF")):
            _save(derivative_path(output_dir, source, suffix="probseg", label=label),
                  (dseg == value).astype(np.float32), affine)
    if "mni" in parts:
        # A perfect "registration": the template itself, brain-masked, on the 2 mm grid.
        tpl = datasets.load_mni152_template(resolution=2)
        brain = datasets.load_mni152_brain_mask(resolution=2)
        warped = tpl.get_fdata(dtype=np.float32) * brain.get_fdata(dtype=np.float32)
        _save(derivative_path(output_dir, source, suffix="T1w", desc="preproc",
                              space=TEMPLATE_SPACE, res="2"), warped, tpl.affine)
        _save(derivative_path(output_dir, source, suffix="mask", desc="brain",
                              space=TEMPLATE_SPACE, res="2"),
              np.asarray(brain.dataobj).astype(np.uint8), brain.affine)
    if qc is not None:
        path = derivative_path(output_dir, source, suffix="qc", extension=".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(qc)), encoding="utf-8")


def write_map(output_dir: Path, source: SourceEntities, model: str, suffix: str) -> Path:
    """A template-space map with a planted blob (positive left, negative right)."""
    brain = datasets.load_mni152_brain_mask(resolution=2)
    ijk = np.indices(brain.shape)
    xyz = (np.einsum("ij,jklm->iklm", brain.affine[:3, :3], ijk)
           + brain.affine[:3, 3, None, None, None])
    data = np.exp(-((xyz[0] + 30) ** 2 + xyz[1] ** 2 + xyz[2] ** 2) / 200.0)
    data -= np.exp(-((xyz[0] - 30) ** 2 + xyz[1] ** 2 + xyz[2] ** 2) / 200.0)
    data *= np.asarray(brain.dataobj) > 0
    path = derivative_path(output_dir, source, suffix=suffix, desc=model, space=TEMPLATE_SPACE,
                           res="2")
    return _save(path, data.astype(np.float32), brain.affine)
