"""Argument checks shared by the statistics modules.

Each helper raises ``TypeError`` or ``ValueError`` with a message that names the
parameter, lists what is allowed and repeats what was received (nilearn style).
"""

from __future__ import annotations

import numbers

import numpy as np

__all__: list[str] = []


def _check_in(value, allowed, name):
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(
            f"'{name}' must be one of {sorted(map(str, allowed))}; got {value!r}."
        )
    return value


def _check_int(value, name, *, minimum=None):
    """Return ``value`` as int; refuse bools, floats and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"'{name}' must be an integer; got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"'{name}' must be >= {minimum}; got {value}.")
    return int(value)


def _check_float(value, name, *, low=None, high=None, inclusive=True):
    """Return ``value`` as a finite float within ``[low, high]`` (or open bounds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"'{name}' must be a real number; got {type(value).__name__} {value!r}.")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"'{name}' must be finite; got {value}.")
    if low is not None and (value < low if inclusive else value <= low):
        raise ValueError(f"'{name}' must be {'>=' if inclusive else '>'} {low}; got {value}.")
    if high is not None and (value > high if inclusive else value >= high):
        raise ValueError(f"'{name}' must be {'<=' if inclusive else '<'} {high}; got {value}.")
    return value


def _as_float_array(x, name, *, ndim=None, min_ndim=1, allow_nan=True):
    """Convert ``x`` to a float64 array and check its dimensionality."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"'{name}' must be numeric array-like; {exc}") from None
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"'{name}' must be {ndim}-dimensional; got shape {arr.shape}.")
    if arr.ndim < min_ndim:
        raise ValueError(f"'{name}' must be at least {min_ndim}-dimensional; got shape {arr.shape}.")
    if not allow_nan and not np.all(np.isfinite(arr)):
        raise ValueError(f"'{name}' must not contain NaN or infinite values.")
    return arr


def _check_samples(a, name, *, minimum=2):
    """Check that ``a`` has at least ``minimum`` observations along axis 0."""
    if a.shape[0] < minimum:
        raise ValueError(f"'{name}' needs at least {minimum} observations; got {a.shape[0]}.")
    return a


def _check_mask(mask, name="mask"):
    """Return ``mask`` as a 3D boolean array with at least one voxel set."""
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"'{name}' must be a 3D array; got shape {arr.shape}.")
    arr = arr.astype(bool)
    if not arr.any():
        raise ValueError(f"'{name}' selects no voxel.")
    return arr
