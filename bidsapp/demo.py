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
import textwrap
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
# Largest first-order volume gain of a CSF voxel from the planted atrophy (per unit severity).
_GROWTH_CAP = 1.0
_ROTATION_MAX_DEG = 10.0
_TRANSLATION_MAX_MM = 10.0
# Head size: males slightly larger (x1.02), females smaller (x0.98), +-2 % individual spread.
_SCALE_BY_SEX = {"M": 1.02, "F": 0.98}
_SCALE_SPREAD = 0.02
_ANISOTROPY = 0.01
_BIAS_RANGE = (0.15, 0.20)
_SNR_RANGE = (20.0, 30.0)
_INDIVIDUAL_WARP_RMS_MM = 0.6
_INDIVIDUAL_WARP_SMOOTH_MM = 15.0
# Scanner field of view (mm) along world L-R, P-A, I-S: the brain never touches its border.
_FOV_MM = (200.0, 256.0, 232.0)
_ORIENTATIONS = (("P", "S", "R"), ("L", "A", "S"), ("L", "P", "S"))
_SITE = "SYN"
_FLOW_STEPS = 3
_GENERATOR_NAME = "brainage-demo"
# Files and folders this builder writes at the top of the dataset (used by ``overwrite``).
_OWNED_TOP_LEVEL = (
    "dataset_description.json",
    "README",
    "participants.tsv",
    "participants.json",
    "sourcedata",
)

DEMO_DESCRIPTION = (
    "Synthetic data, no real participants: every T1w image is the brain-only ICBM 2009a symmetric "
    "MNI152 template bundled with nilearn (nothing downloaded), warped by a known age-related "
    "atrophy field (GM/WM shrinkage with ventricular and CSF enlargement: GM+WM loss about "
    "0.2 %/year at 20-40 y rising to about 0.36 %/year at 60-80 y, 16 % in all; ventricles "
    "nearly double) and, for group PT, an extra bilateral medial temporal atrophy (about 20 % "
    "GM+WM volume loss within 15 mm of MNI (+-25, -20, -15)); then given a small random "
    "individual deformation, "
    "a random head position (rotation +-10 deg, translation +-10 mm, ~2 % scaling), resampled "
    "(2 mm by default) in a non-RAS voxel order, multiplied by a smooth bias field (+-15-20 %) and "
    "given Rician noise (SNR 20-30). Ages 20-80 y; sex and groups (HC/PT) balanced across age. "
    "Images contain no skull, so the demo exercises the 'already skull-stripped' path of "
    "preprocessing."
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


def _age_atrophy_fraction(age: float) -> float:
    """Fraction of template brain tissue (GM+WM) volume removed by the simulated ageing.

    Parameters
    ----------
    age : float
        Age in years, within :data:`AGE_RANGE_YEARS`.

    Returns
    -------
    float
        ``0.0025 (age - 25) + 0.00002 (age - 25)**2``, the divergence scale of the ageing
        field: zero at the template's age of 25 y, 0.198 at 80 y.  The realised GM+WM loss is
        smaller: 0.22 %/y over 20-40 y, 0.29 %/y over 40-60 y, 0.36 %/y over 60-80 y.
    """
    age = _check_real("age", age, *AGE_RANGE_YEARS)
    d = age - _REFERENCE_AGE
    return 0.0025 * d + 0.00002 * d * d


# --------------------------------------------------------------------------------------------
# template and deformation bases (computed once per process: a few seconds)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Volume:
    """Channels-first volume on an axis-aligned grid, sampled at world (mm) coordinates."""

    data: torch.Tensor  # (1, C, I, J, K) float32
    affine: np.ndarray  # voxel -> mm, diagonal linear part

    def __post_init__(self) -> None:
        if not np.allclose(self.affine[:3, :3], np.diag(np.diag(self.affine[:3, :3]))):
            raise ValueError("affine must be axis-aligned")

    def sample(self, points_mm: torch.Tensor, *, border: bool = False) -> torch.Tensor:
        """Trilinearly sample all channels at ``points_mm`` (N, 3) float32; returns (N, C)."""
        size = np.asarray(self.data.shape[2:], dtype=np.float64)
        step = np.diag(self.affine)[:3]
        # world -> grid_sample's [-1, 1] (align_corners=True), per axis: norm = p * a + b
        a = 2.0 / (step * (size - 1.0))
        b = -1.0 - a * self.affine[:3, 3]
        # grid_sample's last axis lists (W, H, D) = (k, j, i)
        grid = torch.addcmul(
            torch.as_tensor(b[::-1].copy(), dtype=torch.float32),
            points_mm.to(torch.float32).flip(1),
            torch.as_tensor(a[::-1].copy(), dtype=torch.float32),
        )
        out = torch.nn.functional.grid_sample(
            self.data,
            grid.reshape(1, 1, 1, -1, 3),
            mode="bilinear",
            padding_mode="border" if border else "zeros",
            align_corners=True,
        )
        return out.reshape(self.data.shape[1], -1).T


@dataclass(frozen=True)
class _Template:
    t1: np.ndarray  # float32, 0-255, brain only
    gm: np.ndarray  # float32 probability
    wm: np.ndarray
    affine: np.ndarray
    ventricles: np.ndarray  # bool
    brain: np.ndarray  # bool, t1 > 0
    reach: np.ndarray  # bool, brain dilated by 8 mm: beyond it no deformation brings brain
    intracranial: np.ndarray  # bool, brain dilated by 12 mm

    @property
    def tissue(self) -> np.ndarray:
        return np.clip(self.gm + self.wm, 0.0, 1.0)

    def world(self) -> list[np.ndarray]:
        """Per-axis world coordinates (mm) of the voxels, broadcastable to the grid."""
        return _axis_coordinates(self.t1.shape, self.affine)


def _axis_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> list[np.ndarray]:
    """World coordinate along each axis of an axis-aligned grid, shaped to broadcast."""
    out = []
    for axis, n in enumerate(shape):
        view = [1, 1, 1]
        view[axis] = n
        coords = np.arange(n, dtype=np.float32) * float(affine[axis, axis]) + float(affine[axis, 3])
        out.append(coords.reshape(view))
    return out


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
    x, y, z = _axis_coordinates(t1.shape, affine)
    box = (np.abs(x) < 35) & (y > -50) & (y < 35) & (z > -10) & (z < 40)
    labels, n_lab = ndi.label((csf > 0.6) & box)
    sizes = ndi.sum_labels(np.ones_like(labels), labels, np.arange(1, n_lab + 1))
    ventricles = np.isin(labels, np.flatnonzero(sizes > 2000) + 1)
    cross = ndi.generate_binary_structure(3, 1)
    reach = ndi.binary_dilation(brain, cross, iterations=8)
    intracranial = ndi.binary_dilation(reach, cross, iterations=4)
    return _Template(t1, gm, wm, affine, ventricles, brain, reach, intracranial)


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
    """Divergence per unit :func:`_age_atrophy_fraction`: tissue shrinks, ventricles and
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


def _spread(volume: float, weight: np.ndarray, cap: float) -> np.ndarray:
    """Density ``min(cap, k * weight)`` summing to ``volume`` (bisection on ``k``)."""
    if cap * float(weight[weight > 0].size) < volume:
        raise ValueError("not enough room to spread the volume under the cap")
    low, high = 0.0, 1.0
    while np.minimum(cap, high * weight).sum() < volume:
        high *= 2.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        if np.minimum(cap, mid * weight).sum() < volume:
            low = mid
        else:
            high = mid
    return np.minimum(cap, high * weight).astype(np.float32)


def _patient_source(tpl: _Template) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Divergence per unit severity for the planted medial-temporal atrophy, on a crop of
    the template grid (returned with its slices).

    Tissue within ~18 mm of each centre shrinks; non-tissue (temporal horn, cisterns, sulci,
    extracerebral space) within ~22 mm grows by the same volume (ex-vacuo enlargement), so the
    field vanishes far from the centres.  Keeping the compensation this close makes the loss
    visible as tissue replaced by CSF, not only as a contraction that a registration would
    have to recover; capping the growth density at :data:`_GROWTH_CAP` keeps small cisterns
    from ballooning.
    """
    lo = np.array([-75.0, -70.0, -65.0]) - tpl.affine[:3, 3]
    hi = np.array([75.0, 30.0, 35.0]) - tpl.affine[:3, 3]
    crop = tuple(slice(int(round(a)), int(round(b)) + 1) for a, b in zip(lo, hi))
    tissue = tpl.tissue[crop]
    # room to grow: non-tissue, except the ventricles that the ageing field already enlarges
    outer = (1.0 - tissue) * tpl.intracranial[crop]
    outer *= 1.0 - ndi.gaussian_filter(tpl.ventricles.astype(np.float32), 1.0)[crop]
    grids = [w[crop] for w in np.broadcast_arrays(*tpl.world())]
    radius = PLANTED_ATROPHY_RADIUS_MM
    source = np.zeros(tissue.shape, dtype=np.float32)
    for centre in PLANTED_ATROPHY_CENTRES_MM:
        r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        shrink = _raised_cosine(r, 0.6 * radius, 1.2 * radius) * tissue
        room = _raised_cosine(r, 1.0 * radius, 1.5 * radius) * outer
        ball = r <= radius
        # Calibrate the amplitude so that (to first order) the tissue-weighted volume change
        # inside the ball, sum(tissue * div u) / sum(tissue), equals -PLANTED_ATROPHY_TISSUE_LOSS;
        # growth inside the ball offsets part of the shrinkage, hence the few iterations.
        in_ball = float(tissue[ball].sum())
        amplitude = PLANTED_ATROPHY_TISSUE_LOSS * in_ball / float((tissue * shrink)[ball].sum())
        for _ in range(6):
            grow = _spread(amplitude * float(shrink.sum()), room, _GROWTH_CAP)
            change = grow - amplitude * shrink
            loss = -float((tissue * change)[ball].sum()) / in_ball
            amplitude *= PLANTED_ATROPHY_TISSUE_LOSS / loss
        source += change
    return source, crop


@dataclass(frozen=True)
class _Bases:
    template: _Template
    ageing: _Volume  # displacement (mm) per unit _age_atrophy_fraction
    patient: _Volume  # displacement (mm) per unit severity
    reach: _Volume  # positions (subject anatomy mm) worth deforming: brain can appear there
    brain_centre_mm: np.ndarray
    wm_level: float  # template T1 value of pure WM


@functools.lru_cache(maxsize=1)
def _deformation_bases() -> _Bases:
    """Solve the two Poisson problems (about 5 s); cached because they do not depend on the
    seed.  Holds about 0.2 GB."""
    tpl = _load_template()
    LOGGER.info("solving the ageing and patient deformation fields on the 1 mm template grid")
    # The ageing field is only needed where brain can be: crop to the intracranial box.
    idx = np.argwhere(tpl.intracranial)
    crop = tuple(slice(int(a), int(b) + 1) for a, b in zip(idx.min(0), idx.max(0)))
    ageing = _irrotational_field(_ageing_source(tpl), pad=16)[(slice(None), *crop)]
    patient_source, pcrop = _patient_source(tpl)
    patient = _irrotational_field(patient_source, pad=24)

    def shifted(sl: tuple[slice, ...]) -> np.ndarray:
        aff = tpl.affine.copy()
        aff[:3, 3] += aff[:3, :3] @ np.array([s.start for s in sl], dtype=float)
        return aff

    world = tpl.world()
    weight = tpl.brain.sum()
    centre = np.array([float((w * tpl.brain).sum() / weight) for w in world])
    wm_level = float(np.median(tpl.t1[tpl.wm > 0.8]))
    return _Bases(
        template=tpl,
        ageing=_Volume(torch.from_numpy(np.ascontiguousarray(ageing))[None], shifted(crop)),
        patient=_Volume(torch.from_numpy(patient)[None], shifted(pcrop)),
        reach=_Volume(
            torch.from_numpy(tpl.reach[crop].astype(np.float32))[None, None], shifted(crop)
        ),
        brain_centre_mm=centre,
        wm_level=wm_level,
    )


@functools.lru_cache(maxsize=2)
def _template_images(voxel_size_mm: float) -> _Volume:
    """T1 (anti-aliased for the target voxel size) and GM+WM probability as one volume."""
    tpl = _load_template()
    # Gaussian with the variance of a box the size of the extra voxel width (1 mm -> v mm)
    sigma = np.sqrt(max(voxel_size_mm**2 - 1.0, 0.0) / 12.0)
    t1 = ndi.gaussian_filter(tpl.t1, sigma) if sigma > 0 else tpl.t1
    stack = np.stack([t1, tpl.tissue])[None]
    return _Volume(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), tpl.affine)


# --------------------------------------------------------------------------------------------
# cohort and per-subject parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Subject:
    label: str
    age: float
    sex: str
    group: str
    severity: float  # planted-atrophy severity (0 for HC)
    rotation_deg: tuple[float, float, float]  # about world x, y, z (applied x, then y, then z)
    translation_mm: tuple[float, float, float]  # scanner position of the brain centroid
    scale: tuple[float, float, float]
    orientation: tuple[str, str, str]
    bias_amplitude: float
    snr: float
    gain: float
    noise_seed: int

    def head_matrix(self) -> np.ndarray:
        """3x3 linear part mapping subject anatomy (MNI-like mm) to scanner mm."""
        rx, ry, rz = np.deg2rad(self.rotation_deg)
        c, s = np.cos([rx, ry, rz]), np.sin([rx, ry, rz])
        rot_x = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
        rot_y = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
        rot_z = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
        return rot_z @ rot_y @ rot_x @ np.diag(self.scale)


def _draw_cohort(n_subjects: int, patient_fraction: float, random_seed: int) -> list[_Subject]:
    rng = np.random.default_rng(random_seed)
    low, high = AGE_RANGE_YEARS
    # jittered grid: uniform-ish ages without the clumps of plain uniform draws
    ages = low + (high - low) * (np.arange(n_subjects) + rng.uniform(size=n_subjects)) / n_subjects
    n_pt = int(np.floor(n_subjects * patient_fraction + 0.5))
    is_pt = np.zeros(n_subjects, dtype=bool)
    # one patient per age stratum, so age is not confounded with group
    for k in range(n_pt):
        first = (k * n_subjects) // n_pt
        last = ((k + 1) * n_subjects) // n_pt
        is_pt[rng.integers(first, last)] = True
    sexes = np.empty(n_subjects, dtype="<U1")
    for members in (np.flatnonzero(is_pt), np.flatnonzero(~is_pt)):
        start = int(rng.integers(2))
        sexes[members] = np.array(["M", "F"])[(np.arange(members.size) + start) % 2]
    order = rng.permutation(n_subjects)  # labels must not reveal age or group
    width = max(2, len(str(n_subjects)))
    subjects = []
    for number, i in enumerate(order, start=1):
        severity = float(rng.uniform(*_SEVERITY_RANGE)) if is_pt[i] else 0.0
        rotation = rng.uniform(-_ROTATION_MAX_DEG, _ROTATION_MAX_DEG, 3)
        translation = rng.uniform(-_TRANSLATION_MAX_MM, _TRANSLATION_MAX_MM, 3)
        iso = _SCALE_BY_SEX[str(sexes[i])] * (1.0 + rng.uniform(-_SCALE_SPREAD, _SCALE_SPREAD))
        scale = iso * (1.0 + rng.uniform(-_ANISOTROPY, _ANISOTROPY, 3))
        subjects.append(
            _Subject(
                label=f"{number:0{width}d}",
                age=round(float(ages[i]), 1),
                sex=str(sexes[i]),
                group="PT" if is_pt[i] else "HC",
                severity=severity,
                rotation_deg=tuple(float(v) for v in rotation),
                translation_mm=tuple(float(v) for v in translation),
                scale=tuple(float(v) for v in scale),
                orientation=_ORIENTATIONS[(number - 1) % len(_ORIENTATIONS)],
                bias_amplitude=float(rng.uniform(*_BIAS_RANGE)),
                snr=float(rng.uniform(*_SNR_RANGE)),
                gain=4.0 * float(rng.uniform(0.9, 1.1)),
                noise_seed=int(rng.integers(2**63 - 1)),
            )
        )
    return subjects


# --------------------------------------------------------------------------------------------
# rendering one subject
# --------------------------------------------------------------------------------------------
# NIfTI axis code -> (world axis, direction)
_AXIS_CODES = {
    "R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)
}


def _native_grid(
    voxel_size_mm: float, orientation: tuple[str, str, str]
) -> tuple[tuple[int, ...], np.ndarray]:
    """Voxel grid of the scanner field of view, centred on the scanner origin."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    shape = []
    for i, code in enumerate(orientation):
        world_axis, sign = _AXIS_CODES[code]
        affine[world_axis, i] = sign * voxel_size_mm
        shape.append(int(round(_FOV_MM[world_axis] / voxel_size_mm)))
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return tuple(shape), affine


def _individual_warp(rng: np.random.Generator, tpl: _Template) -> _Volume:
    """Smooth random displacement (pull-back, mm) standing in for anatomical variability."""
    spacing = 4.0
    world = tpl.world()
    lo = np.array([float(w.min()) for w in world]) - 20.0
    hi = np.array([float(w.max()) for w in world]) + 20.0
    shape = tuple(int(np.ceil((b - a) / spacing)) + 1 for a, b in zip(lo, hi))
    noise = rng.standard_normal((3, *shape))
    sigma = _INDIVIDUAL_WARP_SMOOTH_MM / spacing
    field = np.stack([ndi.gaussian_filter(c, sigma, mode="wrap") for c in noise])
    field *= _INDIVIDUAL_WARP_RMS_MM / np.sqrt((field**2).mean(axis=(1, 2, 3), keepdims=True))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return _Volume(torch.from_numpy(field.astype(np.float32))[None], affine)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth log-field from 3-D cosines up to order 2 (normalised later)."""
    coeffs = rng.standard_normal((3, 3, 3))
    order = np.add.outer(np.add.outer(np.arange(3), np.arange(3)), np.arange(3))
    coeffs /= 1.0 + order
    coeffs[0, 0, 0] = 0.0
    basis = [np.cos(np.pi * np.outer(np.arange(3), np.linspace(0.0, 1.0, n))) for n in shape]
    return np.einsum("abc,ai,bj,ck->ijk", coeffs, *basis, optimize=True)


def _pull_back(
    subject: _Subject, bases: _Bases, warp: _Volume, anatomy: torch.Tensor
) -> torch.Tensor:
    """Template (MNI) mm coordinates of subject-anatomy positions ``anatomy`` (N, 3).

    The atrophy displacement ``v`` is used as a stationary velocity: the subject is the template
    carried along ``v`` for unit time, so the pull-back integrates ``dx/dt = -v(x)`` in
    :data:`_FLOW_STEPS` Euler steps.  Each step moves by less than a voxel per voxel
    (``|grad v| / steps < 1``), so the map cannot fold.
    """
    position = anatomy + warp.sample(anatomy, border=True)
    atrophy = _age_atrophy_fraction(subject.age)
    lo, hi = _bounds(bases.patient)
    for _ in range(_FLOW_STEPS):
        step = atrophy * bases.ageing.sample(position, border=True)
        if subject.severity > 0:
            near = torch.nonzero(torch.all((position >= lo) & (position <= hi), dim=1)).squeeze(1)
            step[near] += subject.severity * bases.patient.sample(position[near])
        position = position - step / _FLOW_STEPS
    return position


def _bounds(volume: _Volume) -> tuple[torch.Tensor, torch.Tensor]:
    corners = volume.affine[:3, :3] @ (np.asarray(volume.data.shape[2:]) - 1.0)
    lo = volume.affine[:3, 3] + np.minimum(corners, 0.0)
    hi = volume.affine[:3, 3] + np.maximum(corners, 0.0)
    return torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)


def _scanner_to_anatomy(subject: _Subject, bases: _Bases) -> np.ndarray:
    """4x4 affine undoing the head position: scanner mm -> subject anatomy (MNI-like) mm."""
    inverse = np.linalg.inv(subject.head_matrix())
    out = np.eye(4)
    out[:3, :3] = inverse
    out[:3, 3] = bases.brain_centre_mm - inverse @ np.asarray(subject.translation_mm)
    return out


def _render_subject(
    subject: _Subject, bases: _Bases, images: _Volume, voxel_size_mm: float
) -> tuple[nib.Nifti1Image, dict[str, float]]:
    """Simulated native-space T1w image and its ground-truth summary."""
    rng = np.random.default_rng(subject.noise_seed)
    shape, affine = _native_grid(voxel_size_mm, subject.orientation)
    # scanner positions -> subject anatomy, as one affine applied to voxel indices
    to_anatomy = _scanner_to_anatomy(subject, bases) @ affine
    lin, off = to_anatomy[:3, :3], to_anatomy[:3, 3]
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    anatomy = np.empty((*shape, 3), dtype=np.float32)
    for c in range(3):
        anatomy[..., c] = (
            lin[c, 0] * axes[0][:, None, None] + lin[c, 1] * axes[1][None, :, None]
            + lin[c, 2] * axes[2][None, None, :] + off[c]
        )
    anatomy = torch.from_numpy(anatomy.reshape(-1, 3))
    # only positions that can hold brain need the (costly) deformation
    inside = torch.nonzero(bases.reach.sample(anatomy)[:, 0] > 0).squeeze(1)
    warp = _individual_warp(rng, bases.template)
    values = images.sample(_pull_back(subject, bases, warp, anatomy[inside])).numpy()
    clean = np.zeros(anatomy.shape[0], dtype=np.float32)
    clean[inside.numpy()] = values[:, 0] * subject.gain
    clean = clean.reshape(shape)
    log_bias = _bias_field(rng, shape)
    brain = clean > 0
    log_bias -= log_bias[brain].mean()
    log_bias *= np.log1p(subject.bias_amplitude) / np.abs(log_bias[brain]).max()
    sigma = subject.gain * bases.wm_level / subject.snr
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    real = clean * np.exp(log_bias, dtype=np.float32)
    real += rng.normal(0.0, sigma, shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, shape).astype(np.float32)
    data = np.clip(np.rint(np.hypot(real, imag)), 0, np.iinfo(np.int16).max).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    voxel_ml = voxel_size_mm**3 / 1000.0
    truth = {"brain_tissue_volume_ml": float(values[:, 1].sum() * voxel_ml)}
    return img, truth


# --------------------------------------------------------------------------------------------
# dataset files
# --------------------------------------------------------------------------------------------
def _readme_text(voxel_size_mm: float, n_subjects: int, n_patients: int, random_seed: int) -> str:
    centres = " and ".join(
        f"({x:+.0f}, {y:+.0f}, {z:+.0f})" for x, y, z in PLANTED_ATROPHY_CENTRES_MM
    )
    low, high = AGE_RANGE_YEARS
    fov = " x ".join(f"{v:g}" for v in _FOV_MM)
    blocks = [
        f"SYNTHETIC DATA - NOT REAL PARTICIPANTS. Built by brainage {__version__} "
        f"(bidsapp.demo.build_demo_dataset, random_seed={random_seed}) without any download.",
        DEMO_DESCRIPTION,
        f"Participants: {n_subjects} ({n_patients} in group PT, synthetic patients; the rest HC, "
        f"healthy controls), one site ({_SITE}). Ages lie on a jittered grid over "
        f"{low:.0f}-{high:.0f} years; each age stratum holds one patient so that age is not "
        "confounded with group; sex alternates within each group.",
        "## How each T1w image was made",
        f"Source: the ICBM 2009a nonlinear symmetric MNI152 template (space {TEMPLATE_SPACE}) as "
        "bundled with nilearn: brain-only T1w plus GM and WM probability maps, 1 mm, 197x233x189.",
        "1. Ageing. An irrotational displacement field u = grad(psi), laplacian(psi) = s, whose "
        "divergence s (the first-order local volume change) is negative in GM (1.5x) and WM (1x) "
        f"and sums to minus the GM+WM volume, +{_VENTRICLE_GAIN:g} in the lateral and third "
        "ventricles, and positive in sulcal and extracerebral CSF so that the intracranial "
        "volume is unchanged. It is scaled by f(age) = 0.0025 (age - 25) + 0.00002 (age - 25)^2 "
        "and applied as a stationary velocity (template age taken as 25 y). Realised GM+WM loss: "
        "0.22 %/year over 20-40 y, 0.29 %/year over 40-60 y, 0.36 %/year over 60-80 y "
        "(1694 -> 1423 mL from 20 to 80 y before head scaling); ventricles grow from 21 to 40 mL.",
        "2. Planted atrophy (group PT only). A second field of the same kind removes, to first "
        f"order, {PLANTED_ATROPHY_TISSUE_LOSS:.0%} of the GM+WM volume inside a "
        f"{PLANTED_ATROPHY_RADIUS_MM:g} mm ball around each of the MNI centres {centres} mm "
        "(bilateral medial temporal lobe / hippocampus), scaled by a per-patient severity drawn "
        f"from U{_SEVERITY_RANGE}. The lost volume goes to the CSF spaces (temporal horn, "
        "cisterns, sulci) and extracerebral space within about "
        f"{1.5 * PLANTED_ATROPHY_RADIUS_MM:.0f} mm, which enlarge ex vacuo (first-order growth "
        f"capped at +{_GROWTH_CAP:.0%} per voxel; the ventricles are left to the ageing field). "
        "Nothing else differs between groups: a voxel-based analysis of modulated GM should find "
        "a reduction in PT there and nowhere else.",
        "3. Individual variability. A smooth random displacement (RMS "
        f"{_INDIVIDUAL_WARP_RMS_MM:g} mm per axis, Gaussian smoothing "
        f"{_INDIVIDUAL_WARP_SMOOTH_MM:g} mm).",
        f"4. Head position. Rotation uniform in +-{_ROTATION_MAX_DEG:g} deg about each axis, "
        f"translation uniform in +-{_TRANSLATION_MAX_MM:g} mm, isotropic scaling 1.02 (M) or "
        "0.98 (F) times U(0.98, 1.02), per-axis U(0.99, 1.01). Scanner coordinates in the "
        "headers are NOT MNI coordinates.",
        "5. Acquisition. Resampled (trilinear, after a Gaussian anti-aliasing filter) to "
        f"{voxel_size_mm:g} mm isotropic voxels over a {fov} mm (L-R, P-A, I-S) field of view, "
        "stored in non-RAS voxel orders (PSR, LAS, LPS in turn), multiplied by a smooth bias "
        "field (exponential of low-order 3-D cosines, peak deviation "
        f"U{_BIAS_RANGE} inside the brain), given Rician noise (white-matter SNR "
        f"U{_SNR_RANGE}) and stored as int16.",
        "The template has no skull, scalp or neck, so these images exercise the 'already "
        f"skull-stripped' path of preprocessing. sourcedata/{_GENERATOR_NAME}/"
        "simulation_parameters.tsv lists the per-subject simulation parameters and the simulated "
        "GM+WM volume (ground truth).",
        "Template licence: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
        "Montreal Neurological Institute, McGill University. Permission to use, copy, modify, and "
        "distribute this software and its documentation for any purpose and without fee is hereby "
        "granted, provided that the above copyright notice appear in all copies. Cite: Fonov et "
        "al., NeuroImage 54 (2011) 313-327, doi:10.1016/j.neuroimage.2010.07.033; Fonov et al., "
        "NeuroImage 47 (2009) S102, doi:10.1016/S1053-8119(09)70884-5.",
    ]
    title = "brainage synthetic demo dataset"
    lines = [title, "=" * len(title), ""]
    for block in blocks:
        if block.startswith("## "):
            lines += [block[3:], "-" * len(block[3:]), ""]
            continue
        indent = "   " if block[:2] in {f"{i}." for i in range(1, 10)} else ""
        text = textwrap.fill(block, width=88, subsequent_indent=indent, break_on_hyphens=False)
        lines += [text, ""]
    return "\n".join(lines)


def _dataset_description(random_seed: int) -> dict:
    return {
        "Name": (
            "brainage synthetic demo (simulated from the MNI152 template; not real participants)"
        ),
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["brainage demo generator (synthetic data)"],
        "Acknowledgements": (
            "Derived from the ICBM 2009a nonlinear symmetric MNI152 template, Copyright (C) "
            "1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
            "Institute, McGill University."
        ),
        "HowToAcknowledge": (
            "Cite Fonov et al. 2011 (doi:10.1016/j.neuroimage.2010.07.033) for the template."
        ),
        "ReferencesAndLinks": [
            "https://doi.org/10.1016/j.neuroimage.2010.07.033",
            "https://doi.org/10.1016/S1053-8119(09)70884-5",
        ],
        "SourceDatasets": [
            {
                "URL": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
                "Version": "ICBM 2009a nonlinear symmetric (copy bundled with nilearn)",
            }
        ],
        "GeneratedBy": [
            {
                "Name": _GENERATOR_NAME,
                "Version": __version__,
                "Description": (
                    f"{DEMO_DESCRIPTION} random_seed={random_seed}. Planted atrophy (group PT): "
                    f"balls of radius {PLANTED_ATROPHY_RADIUS_MM:g} mm around "
                    f"{TEMPLATE_SPACE} mm {list(PLANTED_ATROPHY_CENTRES_MM)}. See README."
                ),
            }
        ],
    }


_PARTICIPANTS_JSON = {
    "participant_id": {"Description": "synthetic participant label"},
    "age": {"Description": "simulated age at scan", "Units": "year"},
    "sex": {"Description": "simulated sex", "Levels": {"M": "male", "F": "female"}},
    "group": {
        "Description": "simulated diagnostic group",
        "Levels": {
            "HC": "healthy control",
            "PT": "synthetic patient (planted bilateral medial temporal atrophy)",
        },
    },
    "site": {"Description": "acquisition site", "Levels": {_SITE: "synthetic (brainage demo)"}},
}

_PARAMETERS_JSON = {
    "age_atrophy_fraction": {"Description": "ageing field scale f(age), see README"},
    "atrophy_severity": {"Description": "planted-atrophy scale (0 for HC)"},
    "rotation_x_deg": {"Description": "head rotation about the L-R axis", "Units": "degree"},
    "rotation_y_deg": {"Description": "head rotation about the P-A axis", "Units": "degree"},
    "rotation_z_deg": {"Description": "head rotation about the I-S axis", "Units": "degree"},
    "translation_x_mm": {"Description": "scanner L-R position of the brain centre", "Units": "mm"},
    "translation_y_mm": {"Description": "scanner P-A position of the brain centre", "Units": "mm"},
    "translation_z_mm": {"Description": "scanner I-S position of the brain centre", "Units": "mm"},
    "scale_x": {"Description": "head scaling along L-R"},
    "scale_y": {"Description": "head scaling along P-A"},
    "scale_z": {"Description": "head scaling along I-S"},
    "voxel_order": {"Description": "NIfTI axis codes of the stored voxel order"},
    "bias_amplitude": {"Description": "peak relative deviation of the bias field in the brain"},
    "snr": {"Description": "white-matter signal over noise standard deviation"},
    "brain_tissue_volume_ml": {
        "Description": "simulated GM+WM volume in the native image (ground truth)",
        "Units": "mL",
    },
}


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _is_previous_demo(root: Path) -> bool:
    try:
        description = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
        return description["GeneratedBy"][0]["Name"] == _GENERATOR_NAME
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def _prepare_root(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str or os.PathLike, got {type(out_dir).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    root = Path(out_dir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise ValueError(f"out_dir {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(
                f"out_dir {root} is not empty; pass overwrite=True to replace a demo dataset"
            )
        if not _is_previous_demo(root):
            # never delete data this builder did not write
            raise ValueError(
                f"out_dir {root} is not empty and does not hold a brainage demo dataset; "
                "refusing to overwrite it even with overwrite=True"
            )
        LOGGER.info("replacing the previous demo dataset in %s", root)
        try:
            for entry in root.iterdir():
                owned = entry.name in _OWNED_TOP_LEVEL
                if owned or (entry.name.startswith("sub-") and entry.is_dir()):
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        except OSError as exc:
            raise NotWritableError(
                f"cannot clear the previous demo dataset in {root}: {exc}"
            ) from exc
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NotWritableError(f"cannot create out_dir {root}: {exc}") from exc
    return root


def build_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    n_subjects: int = 16,
    patient_fraction: float = 0.5,
    voxel_size_mm: float = 2.0,
    random_seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a small synthetic BIDS dataset derived from the bundled MNI152 template.

    Nothing is downloaded.  See :data:`DEMO_DESCRIPTION` and the dataset's README for how the
    images are simulated; the atrophy planted in group ``PT`` lies in balls of radius
    :data:`PLANTED_ATROPHY_RADIUS_MM` around :data:`PLANTED_ATROPHY_CENTRES_MM`.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory that becomes the BIDS root; created if missing.  It must be empty unless
        ``overwrite`` is true and it holds a dataset previously written by this function.
    n_subjects : int, default 16
        Number of participants, 1-500.
    patient_fraction : float, default 0.5
        Fraction of participants in group ``PT`` (rounded to a count), in [0, 1].
    voxel_size_mm : float, default 2.0
        Isotropic voxel size of the stored images, in [1, 4] mm.
    random_seed : int, default 0
        Seed (>= 0); the same seed and arguments give byte-identical files (same machine and
        library versions; other platforms may differ in the last bit of a few voxels).
    overwrite : bool, default False
        Replace a previous (possibly interrupted) demo dataset in ``out_dir``; other entries,
        e.g. ``derivatives/``, are left alone.  ``participants.tsv`` is written last, so its
        presence marks a complete dataset.

    Returns
    -------
    pathlib.Path
        The BIDS root (absolute ``out_dir``).

    Raises
    ------
    TypeError, ValueError
        Invalid arguments, or ``out_dir`` not empty (naming the parameter).
    NotWritableError
        ``out_dir`` cannot be created or written.
    """
    n_subjects = _check_int("n_subjects", n_subjects, 1, 500)
    patient_fraction = _check_real("patient_fraction", patient_fraction, 0.0, 1.0)
    voxel_size_mm = _check_real("voxel_size_mm", voxel_size_mm, 1.0, 4.0)
    random_seed = _check_int("random_seed", random_seed, 0, 2**63 - 1)
    root = _prepare_root(out_dir, overwrite)

    subjects = _draw_cohort(n_subjects, patient_fraction, random_seed)
    bases = _deformation_bases()
    images = _template_images(voxel_size_mm)
    n_patients = sum(s.group == "PT" for s in subjects)
    LOGGER.info("writing %d synthetic participants (%d PT) to %s", n_subjects, n_patients, root)
    sidecar = {
        "SeriesDescription": "synthetic T1w (brainage demo, derived from the MNI152 template)",
        "ImageComments": "simulated brain-only image, no skull; see README",
    }
    parameter_rows = []
    try:
        # The description goes first, so that a build cut short is still recognised as a demo
        # (and can be replaced with overwrite=True); participants.tsv goes last, so that its
        # presence means the dataset is complete.
        _write_json(root / "dataset_description.json", _dataset_description(random_seed))
        for subject in tqdm(subjects, desc="demo participants", unit="participant", disable=None):
            img, truth = _render_subject(subject, bases, images, voxel_size_mm)
            anat = root / f"sub-{subject.label}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            stem = anat / f"sub-{subject.label}_T1w"
            nib.save(img, f"{stem}.nii.gz")
            _write_json(Path(f"{stem}.json"), sidecar)
            geometry = (*subject.rotation_deg, *subject.translation_mm, *subject.scale)
            parameter_rows.append(
                [f"sub-{subject.label}", f"{_age_atrophy_fraction(subject.age):.4f}"]
                + [f"{subject.severity:.3f}", *(f"{v:.3f}" for v in geometry)]
                + ["".join(subject.orientation), f"{subject.bias_amplitude:.3f}"]
                + [f"{subject.snr:.2f}", f"{truth['brain_tissue_volume_ml']:.1f}"]
            )
        (root / "README").write_text(
            _readme_text(voxel_size_mm, n_subjects, n_patients, random_seed), encoding="utf-8"
        )
        truth_dir = root / "sourcedata" / _GENERATOR_NAME
        truth_dir.mkdir(parents=True, exist_ok=True)
        header = ["participant_id", *_PARAMETERS_JSON]
        _write_tsv(truth_dir / "simulation_parameters.tsv", header, parameter_rows)
        _write_json(truth_dir / "simulation_parameters.json", _PARAMETERS_JSON)
        _write_json(root / "participants.json", _PARTICIPANTS_JSON)
        _write_tsv(
            root / "participants.tsv",
            ["participant_id", "age", "sex", "group", "site"],
            [[f"sub-{s.label}", f"{s.age:.1f}", s.sex, s.group, _SITE] for s in subjects],
        )
    except OSError as exc:
        raise NotWritableError(f"cannot write the demo dataset to {root}: {exc}") from exc
    return root
