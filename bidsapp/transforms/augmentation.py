"""Random augmentations of seed 004: shifts, sagittal mirror, gamma and intensity scaling.

Each samples its parameters from the generator it is given and delegates to the
deterministic transform of the same name.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import RandomTransform, parse_range
from .intensity import Gamma, IntensityScale
from .spatial import Flip, Shift

__all__ = ["RandomShift", "RandomFlip", "RandomGamma", "RandomIntensityScale"]


class RandomShift(RandomTransform):
    """Shift by a uniform random whole number of voxels in ``[-max_shift, max_shift]`` per axis.

    Parameters
    ----------
    max_shift : (int, int, int)
        Largest shift per array axis (seed 004 at 2 mm: 10, 10, 2).
    """

    def __init__(self, max_shift: Sequence[int]) -> None:
        max_shift = tuple(int(s) for s in max_shift)
        if len(max_shift) != 3 or min(max_shift) < 0:
            raise ValueError(f"max_shift must be three non-negative ints, got {max_shift!r}")
        self.max_shift = max_shift

    def get_transform(self, rng: np.random.Generator) -> Shift:
        return Shift([int(rng.integers(-m, m + 1)) for m in self.max_shift])


class RandomFlip(RandomTransform):
    """Flip along each of ``axes`` with probability ``p``.

    Parameters
    ----------
    axes : sequence of int
        Candidate axes (0 = left-right in RAS: the sagittal mirror).
    p : float
        Probability per axis.
    """

    def __init__(self, axes: Sequence[int] = (0,), p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.axes = tuple(int(a) for a in axes)
        self.p = float(p)

    def get_transform(self, rng: np.random.Generator) -> Flip:
        return Flip([a for a in self.axes if rng.random() < self.p])


class RandomGamma(RandomTransform):
    """Gamma correction with ``gamma ~ U(lo, hi)`` (seed 004: U(0.7, 1.3)).

    Parameters
    ----------
    gamma_range : float or (float, float)
        ``(lo, hi)`` or a half-width around 1.
    """

    def __init__(self, gamma_range=(0.7, 1.3)) -> None:
        self.gamma_range = parse_range(gamma_range, "gamma_range", min_constraint=1e-6, around=1.0)

    def get_transform(self, rng: np.random.Generator) -> Gamma:
        return Gamma(float(rng.uniform(*self.gamma_range)))


class RandomIntensityScale(RandomTransform):
    """Multiply intensities by ``alpha ~ U(lo, hi)`` (seed 004: U(0.7, 1.3)).

    Parameters
    ----------
    scale_range : float or (float, float)
        ``(lo, hi)`` or a half-width around 1.
    """

    def __init__(self, scale_range=(0.7, 1.3)) -> None:
        self.scale_range = parse_range(scale_range, "scale_range", min_constraint=0.0, around=1.0)

    def get_transform(self, rng: np.random.Generator) -> IntensityScale:
        return IntensityScale(float(rng.uniform(*self.scale_range)))
