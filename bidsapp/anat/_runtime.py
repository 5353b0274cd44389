"""Threads, seeds and nibabel <-> ANTs conversion shared by the ANTs-based stages (private)."""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import tempfile
from collections.abc import Iterator

import nibabel as nib
import numpy as np

from .grid import new_image

__all__: list[str] = []

LOGGER = logging.getLogger("brainage.anat")

_ITK_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_SEED_ENV = "ANTS_RANDOM_SEED"
# ITK sizes its thread pool once per process, from the environment at the first ANTs call:
# remember that size so a later, different request is reported instead of silently ignored.
_itk_threads_in_use: int | None = None
_warned: set[int] = set()


def check_nthreads(omp_nthreads: object) -> int:
    """Validate ``omp_nthreads`` (a positive integer)."""
    if isinstance(omp_nthreads, bool) or not isinstance(omp_nthreads, numbers.Integral):
        raise TypeError(f"omp_nthreads must be an integer, got {type(omp_nthreads).__name__}")
    if omp_nthreads < 1:
        raise ValueError(f"omp_nthreads must be >= 1, got {omp_nthreads}")
    return int(omp_nthreads)


def check_seed(random_seed: object) -> int:
    """Validate ``random_seed`` (an integer in 0 .. 2**31 - 1)."""
    if isinstance(random_seed, bool) or not isinstance(random_seed, numbers.Integral):
        raise TypeError(f"random_seed must be an integer, got {type(random_seed).__name__}")
    if not 0 <= random_seed < 2**31:
        raise ValueError(f"random_seed must be in [0, 2**31), got {random_seed}")
    return int(random_seed)


def import_ants(omp_nthreads: int):
    """Import antspyx with ITK's thread pool sized to ``omp_nthreads`` (first call in a process).

    Returns
    -------
    module
        The ``ants`` module.
    """
    global _itk_threads_in_use
    omp_nthreads = check_nthreads(omp_nthreads)
    if _itk_threads_in_use is None:
        os.environ[_ITK_ENV] = str(omp_nthreads)
        _itk_threads_in_use = omp_nthreads
    elif _itk_threads_in_use != omp_nthreads and omp_nthreads not in _warned:
        _warned.add(omp_nthreads)
        LOGGER.warning("ITK already runs %d threads in this process; omp_nthreads=%d cannot be applied "
                       "(ITK reads %s once per process)", _itk_threads_in_use, omp_nthreads, _ITK_ENV)
    import ants

    return ants


@contextlib.contextmanager
def ants_seed(random_seed: int) -> Iterator[None]:
    """Make ANTs' random sampling repeatable: ``ANTS_RANDOM_SEED`` for the duration of the block.

    antsRegistration reads it when no ``--random-seed`` is given (antspyx passes none unless its
    global deterministic mode is on).  ANTs treats a seed of 0 as "use the clock", so the seed
    handed to ANTs is ``random_seed + 1`` and ``random_seed=0`` stays repeatable.
    """
    seed = check_seed(random_seed) + 1
    previous = os.environ.get(_SEED_ENV)
    os.environ[_SEED_ENV] = str(seed)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_SEED_ENV, None)
        else:
            os.environ[_SEED_ENV] = previous


@contextlib.contextmanager
def private_tempdir() -> Iterator[str]:
    """Point :mod:`tempfile` at a fresh folder for the block and delete it afterwards.

    antspyx writes intermediate files (Atropos posteriors, transforms) with ``mktemp`` into the
    system temporary folder and never removes them; this keeps them from piling up.
    """
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="brainage_ants_") as tmp:
        tempfile.tempdir = tmp
        try:
            yield tmp
        finally:
            tempfile.tempdir = previous


def to_ants(img: nib.spatialimages.SpatialImage, ants_module):
    """nibabel image -> float32 ANTsImage with the same world geometry."""
    clean = new_image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return ants_module.from_nibabel_nifti(clean)


def from_ants(image, dtype: type | np.dtype = np.float32) -> nib.Nifti1Image:
    """ANTsImage -> nibabel image (RAS world geometry) of type ``dtype``."""
    spacing = np.asarray(image.spacing, dtype=float)
    direction = np.asarray(image.direction, dtype=float)
    origin = np.asarray(image.origin, dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing  # columns: axis direction x spacing
    lps[:3, 3] = origin
    # ITK's physical space is LPS; nibabel's world space is RAS
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return new_image(image.numpy(), affine, dtype)
