"""Intensity transforms: the seed-004 normalisation, gamma and scaling."""

from __future__ import annotations

import numpy as np

from .base import Transform, Volume

__all__ = ["PercentileZNormalise", "Gamma", "IntensityScale"]


class PercentileZNormalise(Transform):
    """Seed-004 normalisation: robust z-score, background to 0, clip of bright outliers.

    Mean and SD are computed on the non-background voxels (``!= 0``) whose value lies between
    the ``lower`` and ``upper`` percentiles.  After ``(x - mean) / sd`` the value the background
    takes is subtracted everywhere, so the background is exactly 0 again, and voxels above the
    ``clip`` percentile (of the non-background voxels) are set to that percentile.

    Parameters
    ----------
    lower, upper : float
        Percentiles bounding the voxels used for mean and SD.
    clip : float
        Upper clipping percentile.
    """

    def __init__(self, lower: float = 1.0, upper: float = 99.0, clip: float = 99.9) -> None:
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        if not 0 < clip <= 100:
            raise ValueError(f"clip must be in (0, 100], got {clip}")
        self.lower, self.upper, self.clip = float(lower), float(upper), float(clip)

    def apply_transform(self, volume: Volume) -> Volume:
        data = volume.data.astype(np.float32, copy=False)
        background = data == 0
        values = data[~background]
        if values.size < 10:
            raise ValueError("the volume has (almost) no non-background voxels to normalise")
        lo, hi = np.percentile(values, [self.lower, self.upper])
        inner = values[(values >= lo) & (values <= hi)]
        mean, sd = float(inner.mean()), float(inner.std())
        if not sd > 0:
            raise ValueError("the non-background voxels have zero spread; cannot normalise")
        out = (data - mean) / sd
        out -= (0.0 - mean) / sd  # the background's value after the z-score
        ceiling = np.percentile(out[~background], self.clip)
        np.minimum(out, ceiling, out=out)
        out[background] = 0.0
        return volume.with_data(out.astype(np.float32, copy=False))


class Gamma(Transform):
    """``sign(x) * |x| ** gamma`` (keeps the sign of negative values).

    Parameters
    ----------
    gamma : float
        Exponent (> 0).
    """

    def __init__(self, gamma: float) -> None:
        if not float(gamma) > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)

    def apply_transform(self, volume: Volume) -> Volume:
        data = volume.data
        return volume.with_data((np.sign(data) * np.abs(data) ** self.gamma).astype(data.dtype))


class IntensityScale(Transform):
    """Multiply all voxels by ``factor``.

    Parameters
    ----------
    factor : float
    """

    def __init__(self, factor: float) -> None:
        if not np.isfinite(factor):
            raise ValueError(f"factor must be finite, got {factor!r}")
        self.factor = float(factor)

    def apply_transform(self, volume: Volume) -> Volume:
        return volume.with_data((volume.data * self.factor).astype(volume.data.dtype))
