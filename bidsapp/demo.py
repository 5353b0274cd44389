"""Build a small synthetic BIDS dataset from the bundled MNI152 template (no download).

Every image is derived from nilearn's bundled ICBM 2009a *symmetric* MNI152 template
(brain-only T1w plus GM and WM probability maps, 1 mm).  For each simulated participant the
template is warped by known displacement fields (age-related atrophy, and for patients an
extra bilateral medial-temporal atrophy), placed in a random head position, resampled to the
requested voxel size in a non-RAS voxel order, and corrupted by a multiplicative bias field
and Rician noise.  Because the template has no skull, the demo exercises the
"already skull-stripped" path of preprocessing.

Volume changes are planted with irrotational displacement fields ``u = grad(psi)`` obtained by
solving ``laplacian(psi) = s`` with an FFT: the divergence of ``u`` is then the source ``s``,
so ``s`` directly encodes the local fractional volume change (to first order), and a source
that sums to zero leaves the far field undisturbed.
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft as sfft
import torch
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from . import __version__
from .errors import ImageError, NotWritableError

__all__ = [
    "DEMO_DESCRIPTION",
    "TEMPLATE_SPACE",
    "PLANTED_ATROPHY_CENTRES_MM",
    "PLANTED_ATROPHY_RADIUS_MM",
    "PLANTED_ATROPHY_TISSUE_LOSS",
    "AGE_RANGE_YEARS",
    "age_atrophy_fraction",
    "build_demo_dataset",
]

LOGGER = logging.getLogger("brainage.demo")

TEMPLATE_SPACE = "MNI152NLin2009aSym"
#: Centres (MNI152NLin2009aSym mm, RAS) of the atrophy planted in group ``PT``.
PLANTED_ATROPHY_CENTRES_MM: tuple[tuple[float, float, float], ...] = (
    (-25.0, -20.0, -15.0),
    (25.0, -20.0, -15.0),
)
#: Radius (mm) of the ball around each centre within which the planted tissue loss is measured.
PLANTED_ATROPHY_RADIUS_MM = 15.0
#: Mean GM+WM volume loss inside that ball for a patient of severity 1 (severity ~ U(0.8, 1.2)).
PLANTED_ATROPHY_TISSUE_LOSS = 0.20
AGE_RANGE_YEARS = (20.0, 80.0)

# Template age: ICBM 2009 averages young adults (18.5-43.5 y), so age 25 gets no ageing field.
_REFERENCE_AGE = 25.0
# Fraction of GM+WM volume lost per unit ageing field, GM shrinking 1.5x faster than WM.
_GM_TO_WM_LOSS_RATIO = 1.5
# Ventricular volume gain per unit of brain-tissue loss fraction (linearised divergence).
_VENTRICLE_GAIN = 5.0
_SEVERITY_RANGE = (0.8, 1.2)
_ROTATION_MAX_DEG = 10.0
_TRANSLATION_MAX_MM = 10.0
# Head size: males slightly larger (x1.02), females smaller (x0.98), +-2 % individual spread.
_SCALE_BY_SEX = {"M": 1.02, "F": 0.98}
_SCALE_SPREAD = 0.02
_ANISOTROPY = 0.01
_BIAS_RANGE = (0.15, 0.20)
_SNR_RANGE = (20.0, 30.0)
_INDIVIDUAL_WARP_RMS_MM = 1.0
_INDIVIDUAL_WARP_SMOOTH_MM = 12.0
# Scanner field of view (mm) along world L-R, P-A, I-S: the brain never touches its border.
_FOV_MM = (200.0, 256.0, 232.0)
_ORIENTATIONS = (("P", "S", "R"), ("L", "A", "S"), ("L", "P", "S"))
_SITE = "SYN"
_GENERATOR_NAME = "brainage-demo"
# Files and folders this builder writes at the top of the dataset (used by ``overwrite``).
_OWNED_TOP_LEVEL = (
    "dataset_description.json",
    "README",
    "participants.tsv",
    "participants.json",
    ".bidsignore",
    "sourcedata",
)

DEMO_DESCRIPTION = (
    "Synthetic data, no real participants: every T1w image is the brain-only ICBM 2009a symmetric "
    "MNI152 template bundled with nilearn (nothing downloaded), warped by a known age-related "
    "atrophy field (GM/WM shrinkage with ventricular and CSF enlargement; about 0.2 %/year brain "
    "tissue loss at 25 y rising to about 0.4 %/year at 80 y) and, for group PT, an extra bilateral "
    "medial temporal atrophy (about 20 % GM+WM volume loss within 15 mm of MNI (+-25, -20, -15)), "
    "then given a small random individual deformation, a random head position (rotation +-10 deg, "
    "translation +-10 mm, ~2 % scaling), resampled to 2 mm in a non-RAS voxel order, multiplied by a "
    "smooth bias field (+-15-20 %) and given Rician noise (SNR 20-30). Ages 20-80 y, sex and groups "
    "(HC/PT) balanced across age. Images contain no skull, so the demo exercises the "
    "'already skull-stripped' path of preprocessing."
)


# --------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------
def _check_real(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (low <= value <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not (low <= value <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def age_atrophy_fraction(age: float) -> float:
    """Fraction of template brain tissue (GM+WM) volume removed by the simulated ageing.

    Parameters
    ----------
    age : float
        Age in years, within :data:`AGE_RANGE_YEARS`.

    Returns
    -------
    float
        ``0.002 (age - 25) + 0.00002 (age - 25)**2`` (linearised volume change): zero at the
        template's age of 25 y, 0.17 at 80 y; the loss rate rises from 0.2 %/y to 0.42 %/y.
    """
    age = _check_real("age", age, *AGE_RANGE_YEARS)
    d = age - _REFERENCE_AGE
    return 0.002 * d + 0.00002 * d * d


# --------------------------------------------------------------------------------------------
# template and deformation bases (computed once per process: a few seconds)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Volume:
    """Channels-first volume on a grid, sampled by world (mm) coordinates."""

    data: torch.Tensor  # (1, C, I, J, K) float32
    affine: np.ndarray  # voxel -> mm

    def sample(self, points_mm: np.ndarray, *, border: bool = False) -> np.ndarray:
        """Trilinearly sample all channels at ``points_mm`` (N, 3); returns (N, C)."""
        inv = np.linalg.inv(self.affine)
        vox = points_mm @ inv[:3, :3].T + inv[:3, 3]
        size = np.asarray(self.data.shape[2:], dtype=np.float64)
        norm = 2.0 * vox / (size - 1.0) - 1.0
        # grid_sample's last axis lists (W, H, D) = (k, j, i)
        grid = torch.from_numpy(np.ascontiguousarray(norm[:, ::-1], dtype=np.float32))
        out = torch.nn.functional.grid_sample(
            self.data,
            grid.reshape(1, 1, 1, -1, 3),
            mode="bilinear",
            padding_mode="border" if border else "zeros",
            align_corners=True,
        )
        return out.reshape(self.data.shape[1], -1).T.numpy()


@dataclass(frozen=True)
class _Template:
    t1: np.ndarray  # float32, 0-255, brain only
    gm: np.ndarray  # float32 probability
    wm: np.ndarray
    affine: np.ndarray
    ventricles: np.ndarray  # bool
    brain: np.ndarray  # bool, t1 > 0
    intracranial: np.ndarray  # bool, brain dilated by ~12 mm

    @property
    def tissue(self) -> np.ndarray:
        return np.clip(self.gm + self.wm, 0.0, 1.0)

    def world(self) -> list[np.ndarray]:
        """Per-axis world coordinates (mm) of every voxel (RAS, 1 mm, axis-aligned)."""
        return [
            np.arange(n, dtype=np.float32)[tuple(slice(None) if a == b else None for b in range(3))]
            * float(self.affine[a, a])
            + float(self.affine[a, 3])
            for a, n in enumerate(self.t1.shape)
        ]


def _read_uint8_map(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # corrupt installation: report it as an image problem
        raise ImageError(f"cannot read bundled template {path}: {exc}") from exc
    return data, img.affine


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    from nilearn import datasets

    t1, affine = _read_uint8_map(datasets.MNI152_FILE_PATH)
    gm, _ = _read_uint8_map(datasets.GM_MNI152_FILE_PATH)
    wm, _ = _read_uint8_map(datasets.WM_MNI152_FILE_PATH)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ImageError("expected the bundled MNI152 template at 1 mm in RAS voxel order")
    gm /= 255.0
    wm /= 255.0
    brain = t1 > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    # Ventricular system: large CSF components in a central box (lateral + third ventricle,
    # about 22 mL); the box keeps sulcal CSF at the brain's edge out.
    x, y, z = (
        np.arange(n, dtype=np.float32)[tuple(slice(None) if a == b else None for b in range(3))]
        + float(affine[a, 3])
        for a, n in enumerate(t1.shape)
    )
    box = (np.abs(x) < 35) & (y > -50) & (y < 35) & (z > -10) & (z < 40)
    labels, n_lab = ndi.label((csf > 0.6) & box)
    sizes = ndi.sum_labels(np.ones_like(labels), labels, np.arange(1, n_lab + 1))
    ventricles = np.isin(labels, np.flatnonzero(sizes > 2000) + 1)
    intracranial = ndi.binary_dilation(brain, ndi.generate_binary_structure(3, 1), iterations=12)
    return _Template(t1, gm, wm, affine, ventricles, brain, intracranial)


def _irrotational_field(source: np.ndarray, pad: int) -> np.ndarray:
    """Displacement ``u = grad(psi)`` with ``laplacian(psi) = source`` (1 mm grid, FFT).

    ``source`` must sum to ~0 (the constant mode has no periodic solution). Returns
    (3, *source.shape) float32 so that ``div(u) = source``.
    """
    shape = [sfft.next_fast_len(n + 2 * pad, real=True) for n in source.shape]
    padded = np.zeros(shape, dtype=np.float32)
    inner = tuple(slice(pad, pad + n) for n in source.shape)
    padded[inner] = source
    spectrum = sfft.rfftn(padded, workers=1)
    del padded
    freqs = [2 * np.pi * sfft.fftfreq(n) for n in shape[:2]] + [2 * np.pi * sfft.rfftfreq(shape[2])]
    freqs = [f.astype(np.float32) for f in freqs]
    k2 = freqs[0][:, None, None] ** 2 + freqs[1][None, :, None] ** 2 + freqs[2][None, None, :] ** 2
    k2[0, 0, 0] = np.inf
    psi = spectrum / k2  # = -psi_hat; grad below absorbs the sign
    del spectrum, k2
    field = np.empty((3, *source.shape), dtype=np.float32)
    for axis in range(3):
        shape_k = [1, 1, 1]
        shape_k[axis] = -1
        # u_hat = i k psi_hat = -i k (s_hat / k^2)
        comp = sfft.irfftn(-1j * freqs[axis].reshape(shape_k) * psi, s=shape, workers=1)
        field[axis] = comp[inner]
    return field


def _raised_cosine(r: np.ndarray, r_flat: float, r_zero: float) -> np.ndarray:
    """1 inside ``r_flat``, smooth cosine roll-off to 0 at ``r_zero``."""
    t = np.clip((r - r_flat) / (r_zero - r_flat), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def _ageing_source(tpl: _Template) -> np.ndarray:
    """Divergence per unit :func:`age_atrophy_fraction`: tissue shrinks, ventricles and
    extracerebral CSF grow; sums to zero so the intracranial volume is preserved."""
    gm_w = _GM_TO_WM_LOSS_RATIO
    tissue_volume = float(tpl.gm.sum() + tpl.wm.sum())
    # scale so that the summed tissue divergence equals -1 x total GM+WM volume
    norm = tissue_volume / float(gm_w * tpl.gm.sum() + tpl.wm.sum())
    source = -norm * (gm_w * tpl.gm + tpl.wm)
    source += _VENTRICLE_GAIN * ndi.gaussian_filter(tpl.ventricles.astype(np.float32), 1.0)
    # the rest of the lost volume becomes sulcal and extracerebral CSF
    outer = (1.0 - tpl.tissue) * tpl.intracranial
    outer[tpl.ventricles] = 0.0
    source -= outer * (source.sum() / outer.sum())
    return source.astype(np.float32)


def _patient_source(tpl: _Template) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Divergence per unit severity for the planted medial-temporal atrophy, on a crop of
    the template grid (returned with its slices).  Tissue near each centre shrinks; non-tissue
    (temporal horn, cisterns, sulci, extracerebral space) within ~33 mm grows by the same
    volume, so the field vanishes far from the centres."""
    lo = np.array([-75.0, -70.0, -65.0]) - tpl.affine[:3, 3]
    hi = np.array([75.0, 30.0, 35.0]) - tpl.affine[:3, 3]
    crop = tuple(slice(int(round(a)), int(round(b)) + 1) for a, b in zip(lo, hi))
    tissue = tpl.tissue[crop]
    outer = ((1.0 - tissue) * tpl.intracranial[crop]).astype(np.float32)
    grids = np.meshgrid(
        *[
            np.arange(s.start, s.stop, dtype=np.float32) + float(tpl.affine[a, 3])
            for a, s in enumerate(crop)
        ],
        indexing="ij",
        sparse=True,
    )
    radius = PLANTED_ATROPHY_RADIUS_MM
    source = np.zeros(tissue.shape, dtype=np.float32)
    for centre in PLANTED_ATROPHY_CENTRES_MM:
        r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        shrink = _raised_cosine(r, 0.6 * radius, 1.4 * radius) * tissue
        grow = _raised_cosine(r, 1.4 * radius, 2.2 * radius) * outer
        grow *= shrink.sum() / grow.sum()
        # Calibrate the amplitude so that (to first order) the tissue-weighted volume change
        # inside the ball, sum(tissue * div u) / sum(tissue), equals -PLANTED_ATROPHY_TISSUE_LOSS.
        ball = r <= radius
        per_unit = float((tissue * (grow - shrink))[ball].sum())
        amplitude = -PLANTED_ATROPHY_TISSUE_LOSS * float(tissue[ball].sum()) / per_unit
        source += amplitude * (grow - shrink)
    return source, crop
