"""BIDS validation of the input dataset with bids-validator-deno."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from ..errors import BIDSValidationError

__all__ = ["validate_dataset", "ValidationSummary"]

LOGGER = logging.getLogger("brainage.bids")
_VALIDATOR = "bids-validator-deno"


class ValidationSummary(dict):
    """``{'errors': n, 'warnings': n, 'codes': {code: count}}`` of one validation."""


def validate_dataset(bids_dir: str | Path, *, timeout: float = 600.0) -> ValidationSummary:
    """Run the BIDS validator; raise :class:`BIDSValidationError` when it finds errors.

    A missing validator binary only logs a warning (as fMRIPrep does): validation is a
    courtesy check, not a requirement for processing.

    Parameters
    ----------
    bids_dir : path
        Root of the dataset.
    timeout : float
        Seconds before the validator is abandoned (then a warning is logged).

    Returns
    -------
    ValidationSummary
    """
    exe = shutil.which(_VALIDATOR)
    if exe is None:
        LOGGER.warning("%s not found on PATH: skipping BIDS validation", _VALIDATOR)
        return ValidationSummary(errors=0, warnings=0, codes={})
    try:
        proc = subprocess.run([exe, "--format", "json", str(bids_dir)], capture_output=True,
                              text=True, timeout=timeout, check=False)
        report = json.loads(proc.stdout)
    except subprocess.TimeoutExpired:
        LOGGER.warning("BIDS validation timed out after %.0f s: continuing without it", timeout)
        return ValidationSummary(errors=0, warnings=0, codes={})
    except ValueError:
        LOGGER.warning("could not read the validator's output: continuing without validation "
                       "(%s)", proc.stderr.strip().splitlines()[-1:] or "no message")
        return ValidationSummary(errors=0, warnings=0, codes={})
    issues = report.get("issues", {}).get("issues", [])
    errors = Counter(i["code"] for i in issues if i.get("severity") == "error")
    warnings = Counter(i["code"] for i in issues if i.get("severity") == "warning")
    summary = ValidationSummary(errors=sum(errors.values()), warnings=sum(warnings.values()),
                                codes=dict(errors))
    if errors:
        detail = ", ".join(f"{code} x{n}" for code, n in errors.most_common())
        first = next(i for i in issues if i.get("severity") == "error")
        raise BIDSValidationError(
            f"{bids_dir} fails BIDS validation with {summary['errors']} errors ({detail}; first at "
            f"{first.get('location', '?')}); run `bids-validator-deno {bids_dir}` for details, fix the "
            "dataset, or pass --skip-bids-validation")
    LOGGER.info("BIDS validation passed (%d warnings)", summary["warnings"])
    return summary
