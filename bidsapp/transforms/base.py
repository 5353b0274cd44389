"""Transform machinery in the TorchIO style: a volume type, deterministic and random transforms.

A :class:`Volume` is a 3D array with its voxel-to-world affine (RAS millimetres) and the list
of transforms applied so far.  Deterministic transforms implement ``apply_transform``; random
ones only draw their parameters in ``get_params`` and delegate to their deterministic twin, so
every applied transform is recorded with the parameters it actually used.

Random transforms take an explicit :class:`numpy.random.Generator` instead of a global seed:
the training engine derives one per (seed, epoch, sample), which makes augmentation identical
across resumed runs and across DDP ranks.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any, Sequence

import numpy as np

__all__ = ["Volume", "Transform", "RandomTransform", "Compose", "parse_range"]


@dataclass(frozen=True)
class Volume:
    """A 3D image: data, voxel-to-world affine and the transforms that produced it.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z)
        Voxel values.
    affine : ndarray, shape (4, 4)
        Voxel indices to world millimetres (RAS+).
    history : tuple of (str, dict)
        Applied transforms and their parameters, oldest first.
    """

    data: np.ndarray
    affine: np.ndarray
    history: tuple = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.data, np.ndarray) or self.data.ndim != 3:
            raise ValueError(f"data must be a 3D numpy array, got "
                             f"{getattr(self.data, 'shape', type(self.data).__name__)}")
        affine = np.asarray(self.affine, dtype=float)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def zooms(self) -> np.ndarray:
        """Voxel sizes (mm) along the three array axes."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape."""
        return tuple(self.data.shape)

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None,
                  record: tuple[str, dict] | None = None) -> "Volume":
        """A new volume with other data (and affine), appending ``record`` to the history."""
        history = self.history + ((record,) if record is not None else ())
        return replace(self, data=data, affine=self.affine if affine is None else affine,
                       history=history)

    @classmethod
    def from_nifti(cls, img) -> "Volume":
        """Build from a nibabel image (reoriented to the closest canonical RAS+ orientation)."""
        import nibabel as nib

        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        return cls(data=np.ascontiguousarray(data), affine=canonical.affine)

    def to_nifti(self):
        """The volume as a float32 :class:`nibabel.Nifti1Image`."""
        import nibabel as nib

        img = nib.Nifti1Image(self.data.astype(np.float32), self.affine)
        img.header.set_xyzt_units("mm")
        return img


class Transform(abc.ABC):
    """A deterministic transform of a :class:`Volume`.

    Subclasses implement :meth:`apply_transform` and expose their parameters through
    :meth:`params`, which are recorded in the volume's history.
    """

    def __call__(self, volume: Volume) -> Volume:
        if not isinstance(volume, Volume):
            raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
        out = self.apply_transform(volume)
        return out.with_data(out.data, record=(type(self).__name__, self.params()))

    @abc.abstractmethod
    def apply_transform(self, volume: Volume) -> Volume:
        """Return the transformed volume (without touching the history)."""

    def params(self) -> dict[str, Any]:
        """Parameters of this transform (public attributes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class RandomTransform(abc.ABC):
    """A transform with random parameters drawn from an explicit generator."""

    def __call__(self, volume: Volume, rng: np.random.Generator) -> Volume:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return self.get_transform(rng)(volume)

    @abc.abstractmethod
    def get_transform(self, rng: np.random.Generator) -> Transform:
        """Draw parameters and return the deterministic transform to apply."""


class Compose:
    """Apply transforms in order; random ones receive the generator.

    Parameters
    ----------
    transforms : sequence of Transform or RandomTransform
    """

    def __init__(self, transforms: Sequence[Transform | RandomTransform]) -> None:
        for i, item in enumerate(transforms):
            if not isinstance(item, (Transform, RandomTransform)):
                raise TypeError(f"transforms[{i}] must be a Transform or RandomTransform, "
                                f"got {type(item).__name__}")
        self.transforms = list(transforms)

    def __call__(self, volume: Volume, rng: np.random.Generator | None = None) -> Volume:
        for item in self.transforms:
            if isinstance(item, RandomTransform):
                if rng is None:
                    raise ValueError(f"{type(item).__name__} is random: pass rng=")
                volume = item(volume, rng)
            else:
                volume = item(volume)
        return volume

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def parse_range(value: Real | Sequence[Real], name: str, *, min_constraint: float | None = None,
                max_constraint: float | None = None, around: float = 0.0) -> tuple[float, float]:
    """Turn ``d`` into ``(around - d, around + d)`` and check ``(lo, hi)`` pairs.

    Parameters
    ----------
    value : number or pair of numbers
        A half-width (scalar) or explicit ``(lo, hi)``.
    name : str
        Parameter name used in error messages.
    min_constraint, max_constraint : float, optional
        Allowed bounds of the range.
    around : float
        Centre used for a scalar ``value``.

    Examples
    --------
    >>> parse_range(0.3, "gamma", around=1.0)
    (0.7, 1.3)
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a (min, max) pair, got {value!r}")
    if isinstance(value, Real):
        if value < 0:
            raise ValueError(f"{name} as a half-width must be >= 0, got {value}")
        lo, hi = around - float(value), around + float(value)
    else:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a number or a (min, max) pair, got {value!r}") from exc
    if lo > hi:
        raise ValueError(f"{name}: min must be <= max, got ({lo}, {hi})")
    if min_constraint is not None and lo < min_constraint:
        raise ValueError(f"{name}: values must be >= {min_constraint}, got ({lo}, {hi})")
    if max_constraint is not None and hi > max_constraint:
        raise ValueError(f"{name}: values must be <= {max_constraint}, got ({lo}, {hi})")
    return round(lo, 12), round(hi, 12)
