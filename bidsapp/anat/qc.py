"""Volumes and the per-T1w QC record (``*_qc.json``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .grid import voxel_volume_ml

__all__ = ["QC_FLAGS", "mask_volume_ml", "map_volume_ml", "build_qc", "write_json"]

#: Boolean flags of the QC record (all under its ``flags`` key).
QC_FLAGS = ("skull_stripped_input", "thick_slice", "anisotropic", "oblique")


def mask_volume_ml(mask: nib.spatialimages.SpatialImage) -> float:
    """Volume (mL) of the non-zero voxels of a mask."""
    return float(np.count_nonzero(np.asarray(mask.dataobj))) * voxel_volume_ml(mask)


def map_volume_ml(tpm: nib.spatialimages.SpatialImage) -> float:
    """Integral (mL) of a probability (or modulated) map: sum of voxel values times voxel volume."""
    return float(np.asarray(tpm.dataobj, dtype=np.float64).sum()) * voxel_volume_ml(tpm)


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_qc(*, inspection: Mapping[str, Any], brainmask: Mapping[str, Any], registration: Mapping[str, Any],
             segmentation: Mapping[str, Any], modulation: Mapping[str, Any],
             seconds: Mapping[str, float], cpu_seconds: Mapping[str, float] | None = None,
             warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Assemble the QC record from the stages' reports.

    Parameters
    ----------
    inspection : mapping
        :meth:`bidsapp.anat.checks.T1wInspection.as_dict`.
    brainmask : mapping
        Info of :func:`bidsapp.anat.brainmask.extract_brain`.
    registration : mapping
        ``registration_similarity`` and ``registration_similarity_metric``.
    segmentation : mapping
        ``gm_volume_ml``, ``wm_volume_ml``, ``csf_volume_ml``.
    modulation : mapping
        Totals of the modulated maps (``modulated_volume_ml``).
    seconds : mapping
        Wall seconds per stage.
    cpu_seconds : mapping, optional
        CPU seconds (all threads) per stage: with other jobs on the machine, wall time inflates
        but CPU time does not.
    warnings : sequence of str
        Extra warnings.

    Returns
    -------
    dict
        Top-level numbers (``mask_volume_ml``, ``gm/wm/csf_volume_ml``,
        ``registration_similarity``), ``registration_similarity_metric``, ``input``, ``flags``,
        ``warnings``, ``seconds`` (wall, with ``total``), ``cpu_seconds`` and
        ``modulated_volume_ml``.  The only booleans are inside ``flags``.
    """
    all_warnings = [*inspection.get("warnings", []), *brainmask.get("warnings", []),
                    *registration.get("warnings", []), *segmentation.get("warnings", []), *warnings]
    stage_seconds = {str(k): round(float(v), 2) for k, v in seconds.items()}
    stage_seconds["total"] = round(sum(stage_seconds.values()), 2)
    stage_cpu = {str(k): round(float(v), 2) for k, v in (cpu_seconds or {}).items()}
    if stage_cpu:
        stage_cpu["total"] = round(sum(stage_cpu.values()), 2)
    record = {
        "mask_volume_ml": brainmask.get("mask_volume_ml"),
        "gm_volume_ml": segmentation.get("gm_volume_ml"),
        "wm_volume_ml": segmentation.get("wm_volume_ml"),
        "csf_volume_ml": segmentation.get("csf_volume_ml"),
        "registration_similarity": registration.get("registration_similarity"),
        "registration_similarity_metric": registration.get("registration_similarity_metric"),
        "template": registration.get("template"),
        "input": {key: inspection.get(key) for key in
                  ("shape", "voxel_size_mm", "orientation", "obliquity_deg", "nonfinite_voxels")},
        "flags": {
            "skull_stripped_input": bool(brainmask.get("skull_stripped_input", False)),
            "thick_slice": bool(inspection.get("thick_slice", False)),
            "anisotropic": bool(inspection.get("anisotropic", False)),
            "oblique": bool(inspection.get("oblique", False)),
        },
        "warnings": list(dict.fromkeys(str(w) for w in all_warnings)),
        "seconds": stage_seconds,
        "cpu_seconds": stage_cpu,
        "brain_extraction": {key: brainmask.get(key) for key in ("deepbet_volume_ml", "extracranial_ml")},
        "tissue_class_means": segmentation.get("class_means"),
        "modulated_volume_ml": dict(modulation.get("modulated_volume_ml", {})),
    }
    return _clean(record)


def write_json(path: str | os.PathLike, content: Mapping[str, Any]) -> Path:
    """Write ``content`` as indented JSON (NaN/Inf as null) and return the path."""
    out = Path(path)
    out.write_text(json.dumps(_clean(content), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out
