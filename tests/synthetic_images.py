"""Tiny synthetic images for tests (importable by name: tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["write_image", "blob_t1w"]


def write_image(path: Path, data: np.ndarray, zooms=(2.0, 2.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms, 1.0])
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def blob_t1w(shape=(40, 48, 40), seed=0) -> np.ndarray:
    """A bright ellipsoid 'brain' in a dark background (enough for input checks)."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radius = np.array(shape) * 0.35
    inside = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
    noise = np.random.default_rng(seed).normal(0, 5, shape)
    return (inside * 400 + 50 + noise).astype(np.float32)
