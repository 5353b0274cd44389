"""Chronological age (and sex, site) of each T1w, looked up the way nibabies does.

Order: the session's ``scans.tsv`` row of the file, then ``sessions.tsv``, then
``participants.tsv``; the first non-missing value wins.  In each table the first column
present among ``age_weeks``, ``age_months``, ``age_years`` and ``age`` is used, with the
``Units`` of the JSON sidecar (BIDS defines a bare ``age`` as years).  Units are converted,
never guessed: an unknown unit or a value that is not a number raises :class:`AgeError`.
``89+`` (the deprecated privacy cap) is read as 89 and flagged ``age_censored``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AgeError

__all__ = ["ScanInfo", "lookup_scan_info", "to_years", "read_tsv", "SEX_CODES", "sex_code"]

LOGGER = logging.getLogger("brainage.bids")

_DAYS_PER_YEAR = 365.25
# Unit spellings seen in BIDS sidecars, mapped to years per unit.
_UNITS = {
    **dict.fromkeys(("year", "years", "yr", "yrs", "y", "a"), 1.0),
    **dict.fromkeys(("month", "months", "mo", "mon", "mth"), 1.0 / 12.0),
    **dict.fromkeys(("week", "weeks", "wk", "wks", "w"), 7.0 / _DAYS_PER_YEAR),
    **dict.fromkeys(("day", "days", "d"), 1.0 / _DAYS_PER_YEAR),
}
_COLUMN_UNITS = {"age_weeks": "weeks", "age_months": "months", "age_years": "years"}
_AGE_COLUMNS = ("age_weeks", "age_months", "age_years", "age")
_SEX_COLUMNS = ("sex", "gender")
_SITE_COLUMNS = ("site", "scanner", "site_id", "center", "centre")
_VALUE_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*(\+?)\s*([A-Za-z_ ]*?)\s*$")
_MISSING = {"", "n/a", "na", "nan"}
#: Sex labels (lower case) and their numeric code: 0 female, 1 male (seed 003's coding, used by
#: the stacks of ``vgg-cbv`` at training and at prediction time).
SEX_CODES = {"f": 0, "female": 0, "w": 0, "woman": 0, "0": 0,
             "m": 1, "male": 1, "man": 1, "1": 1}


@dataclass
class ScanInfo:
    """Phenotype of one T1w.

    Attributes
    ----------
    age : float or None
        Age at scan in years, ``None`` when unknown.
    age_censored : bool
        True when the table gave ``89+``.
    age_source : str or None
        Table (relative to the dataset) the age came from.
    sex, site : str or None
        From the first table that has them.
    warnings : list of str
        Lookups that found nothing or something unusual.
    """

    age: float | None = None
    age_censored: bool = False
    age_source: str | None = None
    sex: str | None = None
    site: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {"age": self.age, "age_censored": self.age_censored, "age_source": self.age_source,
                "sex": self.sex, "site": self.site, "warnings": list(self.warnings)}


def to_years(value: Any, unit: str | None, *, where: str) -> tuple[float | None, bool]:
    """Convert one table cell to years.

    Parameters
    ----------
    value : str or number
        The cell (``'23'``, ``'6 years'``, ``'89+'``, ``'n/a'`` …).
    unit : str or None
        Unit from the sidecar or the column name; ``None`` means years (the BIDS default).
    where : str
        File and row, used in error messages.

    Returns
    -------
    years : float or None
        ``None`` for a missing value.
    censored : bool
        True for ``89+``.

    Examples
    --------
    >>> years, censored = to_years("23", "months", where="x")
    >>> round(years, 4), censored
    (1.9167, False)
    >>> to_years("89+", None, where="x")
    (89.0, True)
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, False
    text = str(value).strip()
    if text.lower() in _MISSING:
        return None, False
    match = _VALUE_RE.match(text)
    if not match:
        raise AgeError(f"{where}: age {text!r} is not a number; write a number in the column's "
                       f"unit (or n/a) and give the unit as 'Units' in the JSON sidecar")
    number, plus, inline_unit = float(match.group(1)), bool(match.group(2)), match.group(3).strip()
    units = [u for u in (unit, inline_unit or None) if u]
    factors = set()
    for name in units:
        key = name.strip().lower()
        if key not in _UNITS:
            raise AgeError(f"{where}: age unit {name!r} cannot be converted to years; use one of "
                           "years, months, weeks or days (e.g. 'Units': 'months' in the sidecar)")
        factors.add(_UNITS[key])
    if len(factors) > 1:
        raise AgeError(f"{where}: age {text!r} contradicts the sidecar unit {unit!r}")
    years = number * (factors.pop() if factors else 1.0)
    if years < 0:
        raise AgeError(f"{where}: age {text!r} is negative; ages must be >= 0")
    if plus and not math.isclose(number, 89.0):
        raise AgeError(f"{where}: age {text!r}: only '89+' is a recognised censored age")
    if plus and years != number:
        # the privacy cap is 89 *years*; 89+ in months (7.4 y) would be a silent misreading
        raise AgeError(f"{where}: age {text!r} is the censored age in years, but the unit here is "
                       f"{unit or inline_unit!r}; write ages of 89 years and over as 89+ in a column "
                       "in years")
    if years > 120:
        raise AgeError(f"{where}: age {text!r} ({years:.1f} y) is implausible; check the units")
    return years, plus


def sex_code(value: Any) -> int | None:
    """0 (female) or 1 (male) for a sex label of :data:`SEX_CODES`; ``None`` when unknown.

    Missing values (``None``, ``n/a``) and labels outside :data:`SEX_CODES` (e.g. ``other``)
    give ``None``: the caller decides what a model does without the sex.

    Examples
    --------
    >>> sex_code("F"), sex_code(" Male "), sex_code(1), sex_code("n/a"), sex_code("other")
    (0, 1, 1, None, None)
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real) and value in (0, 1):
        return int(value)
    return SEX_CODES.get(str(value).strip().lower())


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a BIDS TSV into (header, rows of stripped strings); tolerant of ragged spaces."""
    lines = [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        return [], []
    header = [h.strip() for h in lines[0].split("\t")]
    rows = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.split("\t")]
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    return header, rows


def _sidecar_units(tsv: Path, column: str, bids_dir: Path) -> str | None:
    """``Units`` of ``column`` from the TSV's sidecar, or the inherited top-level one."""
    candidates = [tsv.with_suffix(".json")]
    suffix = tsv.stem.rsplit("_", 1)[-1]
    candidates.append(bids_dir / f"{suffix}.json")
    for sidecar in candidates:
        if sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise AgeError(f"{sidecar}: not valid JSON ({exc}); fix or remove the file") from exc
            entry = meta.get(column)
            if isinstance(entry, dict) and entry.get("Units"):
                return str(entry["Units"])
    return None


def _age_from_row(row: dict[str, str], tsv: Path, bids_dir: Path, rel: str) -> tuple[float | None, bool]:
    for column in _AGE_COLUMNS:
        if column in row:
            unit = _COLUMN_UNITS.get(column) or _sidecar_units(tsv, column, bids_dir)
            return to_years(row[column], unit, where=f"{rel} (column '{column}')")
    return None, False


def _first(row: dict[str, str], columns: tuple[str, ...]) -> str | None:
    for column in columns:
        value = row.get(column, "").strip()
        if value and value.lower() not in _MISSING:
            return value
    return None


def lookup_scan_info(bids_dir: str | Path, t1w: str | Path, subject: str,
                     session: str | None = None) -> ScanInfo:
    """Age, sex and site of one T1w from the dataset's tables.

    Parameters
    ----------
    bids_dir : path
        Root of the raw BIDS dataset.
    t1w : path
        The T1w file (inside ``bids_dir``).
    subject, session : str
        Labels without prefixes.

    Returns
    -------
    ScanInfo
    """
    bids_dir, t1w = Path(bids_dir), Path(t1w)
    info = ScanInfo()
    sub_dir = bids_dir / f"sub-{subject}"
    ses_dir = sub_dir / f"ses-{session}" if session else sub_dir
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    rel_name = t1w.relative_to(ses_dir).as_posix() if t1w.is_relative_to(ses_dir) else t1w.name
    tables: list[tuple[Path, str, str]] = [
        (ses_dir / f"{prefix}_scans.tsv", "filename", rel_name),
        (sub_dir / f"sub-{subject}_sessions.tsv", "session_id", f"ses-{session}"),
        (bids_dir / "participants.tsv", "participant_id", f"sub-{subject}"),
    ]
    for tsv, key, wanted in tables:
        if not tsv.is_file() or (key == "session_id" and not session):
            continue
        rel = tsv.relative_to(bids_dir).as_posix()
        _, rows = read_tsv(tsv)
        row = next((r for r in rows if r.get(key) == wanted), None)
        if row is None and key == "filename":
            # Tolerate a bare file name (no 'anat/'), which some converters write.
            row = next((r for r in rows if r.get(key) == t1w.name), None)
            if row is None and rows:
                info.warnings.append(f"{rel} has no row for {rel_name} (it lists "
                                     f"{', '.join(r.get(key, '?') for r in rows)}); age not taken from it")
        if row is None:
            continue
        if info.age is None:
            age, censored = _age_from_row(row, tsv, bids_dir, rel)
            if age is not None:
                info.age, info.age_censored, info.age_source = age, censored, rel
        info.sex = info.sex or _first(row, _SEX_COLUMNS)
        info.site = info.site or _first(row, _SITE_COLUMNS)
    if info.age is None:
        info.warnings.append("no age found in scans.tsv, sessions.tsv or participants.tsv: "
                             "brain age is predicted but brain_pad is n/a")
    if info.age_censored:
        info.warnings.append("age given as 89+ (censored): used as 89 and flagged")
    return info
