"""Typed errors raised by the library.

Library code never calls ``sys.exit``: it raises one of these, and the one CLI module
(:mod:`bidsapp.cli.run`) maps each class to the documented exit code.  Each class subclasses
the builtin that describes it best, so callers may also catch it as that builtin.
"""

from __future__ import annotations

__all__ = [
    "BrainageError",
    "UsageError",
    "AnalysisLevelError",
    "BIDSValidationError",
    "EmptySelectionError",
    "OutputLocationError",
    "ImageError",
    "AgeError",
    "PhenotypeError",
    "InputMissingError",
    "NotWritableError",
    "ModelError",
    "ParticipantFailure",
]


class BrainageError(Exception):
    """Base class of every error the app reports to the user as one clear line."""


class UsageError(BrainageError, ValueError):
    """Options that contradict each other or name something unknown (exit 64)."""


class AnalysisLevelError(UsageError):
    """The analysis level is neither ``participant`` nor ``group`` (exit 17)."""


class BIDSValidationError(BrainageError, ValueError):
    """The input dataset fails BIDS validation (exit 16)."""


class EmptySelectionError(BrainageError, LookupError):
    """Participant/session labels or a BIDS filter matched no T1w image (exit 18)."""


class OutputLocationError(BrainageError, ValueError):
    """``output_dir`` (or the work dir) is ``bids_dir`` itself or inside it (exit 64)."""


class ImageError(BrainageError, ValueError):
    """An image that cannot be read or is not a usable 3D T1w (exit 65)."""


class AgeError(BrainageError, ValueError):
    """An age value or its units cannot be parsed without guessing (exit 65)."""


class PhenotypeError(BrainageError, ValueError):
    """A phenotype column or group label asked for does not exist (exit 65)."""


class InputMissingError(BrainageError, FileNotFoundError):
    """``bids_dir`` or another required input (e.g. any T1w image) does not exist (exit 66)."""


class NotWritableError(BrainageError, PermissionError):
    """The output or work directory cannot be created or written, e.g. disk full (exit 73)."""


class ModelError(BrainageError, ValueError):
    """Model weights missing, tampered with (sha256 mismatch) or unusable (exit 65)."""


class ParticipantBusyError(BrainageError, RuntimeError):
    """Every selected participant is being processed by another run into the same output (exit 75)."""


class ParticipantFailure(BrainageError, RuntimeError):
    """Some participants failed while others completed (exit 1)."""
