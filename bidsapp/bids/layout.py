"""Input queries: which T1w images this run processes.

Every T1w (each session, acquisition and run) is one unit of work.  The default query can be
overridden with a ``--bids-filter-file`` of the fMRIPrep form ``{"t1w": {entity: value}}``,
where ``null`` means the entity must be absent and ``"*"`` any value.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..derivatives import SourceEntities
from ..errors import EmptySelectionError, InputMissingError, UsageError
from ..jsonfiles import read_json_file
from .ages import ScanInfo, lookup_scan_info

__all__ = ["T1wUnit", "DEFAULT_QUERY", "load_bids_filters", "collect_t1w_units", "normalise_labels"]

LOGGER = logging.getLogger("brainage.bids")
DEFAULT_QUERY: dict[str, Any] = {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]}
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class T1wUnit:
    """One T1w image and what is known about it."""

    path: Path
    source: SourceEntities
    info: ScanInfo

    @property
    def relpath(self) -> str:
        """Path relative to the dataset root (for ``Sources`` URIs)."""
        parts = self.path.parts
        idx = max(i for i, p in enumerate(parts) if p == f"sub-{self.source.subject}")
        return Path(*parts[idx:]).as_posix()


def normalise_labels(labels: Sequence[str] | None, prefix: str) -> list[str] | None:
    """Strip ``sub-``/``ses-`` prefixes, de-duplicate and sort; refuse unsafe labels.

    Examples
    --------
    >>> normalise_labels(["sub-02", "01", "02"], "sub")
    ['01', '02']
    """
    if not labels:
        return None
    out = set()
    for label in labels:
        text = str(label).strip()
        if text.startswith(f"{prefix}-"):
            text = text[len(prefix) + 1:]
        if not _LABEL_RE.match(text):
            raise UsageError(f"invalid {prefix} label {label!r}: BIDS labels are letters and digits "
                             f"only (e.g. --{'participant' if prefix == 'sub' else 'session'}-label 01)")
        out.add(text)
    return sorted(out)


def load_bids_filters(path: str | Path | None) -> dict[str, Any]:
    """Read a ``--bids-filter-file`` and return the ``t1w`` query merged over the default."""
    query = dict(DEFAULT_QUERY)
    if path is None:
        return query
    path = Path(path)
    content = read_json_file(path, "--bids-filter-file", missing=UsageError, invalid=UsageError)
    if not isinstance(content, dict) or set(content) - {"t1w"}:
        raise UsageError(f"--bids-filter-file {path}: expected {{\"t1w\": {{entity: value}}}}, "
                         f"got keys {sorted(content) if isinstance(content, dict) else type(content).__name__}")
    query.update(content.get("t1w", {}))
    return query


def _to_pybids(query: Mapping[str, Any]) -> dict[str, Any]:
    from bids.layout import Query

    def convert(value: Any) -> Any:
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value
    return {key: convert(value) for key, value in query.items()}


def collect_t1w_units(bids_dir: str | Path, *, participant_labels: Sequence[str] | None = None,
                      session_labels: Sequence[str] | None = None,
                      query: Mapping[str, Any] | None = None,
                      database_path: str | Path | None = None) -> list[T1wUnit]:
    """Select the T1w images to process.

    Parameters
    ----------
    bids_dir : path
        Root of the raw dataset.
    participant_labels, session_labels : sequence of str, optional
        Labels without prefixes (see :func:`normalise_labels`).
    query : mapping, optional
        PyBIDS query for the T1w (default :data:`DEFAULT_QUERY`).
    database_path : path, optional
        Where pybids may keep its index.

    Returns
    -------
    list of T1wUnit
        Sorted by path.

    Raises
    ------
    InputMissingError
        When ``bids_dir`` is not a BIDS dataset, or it (or the requested participants) has no T1w.
    EmptySelectionError
        When a requested label does not exist or the session labels or filters exclude every T1w.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputMissingError(f"{bids_dir} has no dataset_description.json: not a BIDS dataset "
                                "(point bids_dir at the dataset root)")
    query = dict(query or DEFAULT_QUERY)
    if participant_labels:
        # Index only the requested subjects (fMRIPrep does the same) - much faster on big datasets.
        ignore = [re.compile(r"^(?!/sub-(%s)($|/))sub-" % "|".join(participant_labels)),
                  "code", "sourcedata", "derivatives", re.compile(r"/\.")]
    else:
        ignore = ["code", "sourcedata", "derivatives", re.compile(r"/\.")]
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=False)
    layout = BIDSLayout(bids_dir, indexer=indexer, validate=False,
                        database_path=str(database_path) if database_path else None)
    available = set(layout.get_subjects())
    if participant_labels:
        missing = sorted(set(participant_labels) - available)
        if missing:
            raise EmptySelectionError(
                f"participant label(s) {', '.join(missing)} not found in {bids_dir} "
                f"(it has {len(available)} subjects, e.g. {', '.join(sorted(available)[:5])})")
        query["subject"] = list(participant_labels)
    if session_labels:
        query["session"] = list(session_labels)
    try:
        files = layout.get(return_type="file", **_to_pybids(query))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid BIDS query {query}: {exc}") from exc
    if not files:
        # No T1w at all (for these participants) is missing input (66, as BEP027 recommends);
        # T1w images that the session labels or filters exclude are an empty selection (18).
        default = dict(DEFAULT_QUERY, **({"subject": list(participant_labels)} if participant_labels else {}))
        if not layout.get(return_type="file", **_to_pybids(default)):
            whose = f" for sub-{', sub-'.join(participant_labels)}" if participant_labels else ""
            raise InputMissingError(
                f"{bids_dir} has no T1w image{whose}: brainage needs "
                "sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_...]_T1w.nii[.gz]")
        raise EmptySelectionError(f"no T1w image in {bids_dir} matches the selection {query}; "
                                  "check --participant-label/--session-label/--bids-filter-file")
    units = []
    for file in sorted(files):
        path = Path(file)
        source = SourceEntities.from_path(path)
        info = lookup_scan_info(bids_dir, path, source.subject, source.session)
        units.append(T1wUnit(path=path, source=source, info=info))
    return units
