"""The config-table round trip shared by the input specs (frozen dataclasses)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Mapping, TypeVar

__all__ = ["SpecTable"]

_Spec = TypeVar("_Spec", bound="SpecTable")


class SpecTable:
    """Mixin of a frozen dataclass of plain parameters: built from and written to a config table.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Spec(SpecTable):
    ...     size: int = 2
    >>> Spec.from_dict({"size": 3}).to_dict()
    {'size': 3}
    >>> Spec.from_dict({"sise": 3})
    Traceback (most recent call last):
    ...
    ValueError: unknown input parameter(s) ['sise']; allowed: ['size']
    """

    @classmethod
    def from_dict(cls: type[_Spec], values: Mapping[str, Any]) -> _Spec:
        """Build from a config table; unknown keys are refused (naming the allowed ones)."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"unknown input parameter(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/TOML-serialisable)."""
        return asdict(self)
