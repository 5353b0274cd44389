"""Training data: T1w scans with ages from BIDS, inputs from ``brainage``'s own derivatives.

There is no second preprocessing here: each scan's ``desc-preproc_T1w`` and ``desc-brain_mask``
are looked up in the participant-level outputs of ``brainage`` and handed to the model family's
input preparation.  Prepared inputs are cached (compressed float16) in the work directory,
keyed by the family, its input parameters and the source files' size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bidsapp.bids import collect_t1w_units
from bidsapp.derivatives import derivative_path
from bidsapp.errors import InputMissingError

__all__ = ["ScanRecord", "collect_records", "InputCache"]

LOGGER = logging.getLogger("brainage.training")


@dataclass(frozen=True)
class ScanRecord:
    """One training scan.

    Attributes
    ----------
    key : str
        Entity prefix of the T1w (``sub-01_ses-A``), unique per scan.
    participant : str
        Participant label without ``sub-`` (splits are made on this).
    t1w, mask : Path
        Participant-level derivatives: preprocessed T1w (native) and brain mask.
    age : float
        Age at scan (years).
    sex, site : str or None
    """

    key: str
    participant: str
    t1w: Path
    mask: Path
    age: float
    sex: str | None = None
    site: str | None = None


def collect_records(bids_dir: Path, derivatives: Sequence[Path], *,
                    participant_labels: Sequence[str] | None = None) -> list[ScanRecord]:
    """Every T1w of ``bids_dir`` that has an age and participant-level derivatives.

    Scans without an age or without derivatives are skipped with a warning (the count is
    logged), so a partly processed dataset can already be used.

    Raises
    ------
    InputMissingError
        When no scan has both.
    """
    units = collect_t1w_units(bids_dir, participant_labels=participant_labels)
    records, no_age, no_derivs = [], [], []
    for unit in units:
        if unit.info.age is None:
            no_age.append(unit.source.prefix)
            continue
        found = None
        for root in derivatives:
            t1w = derivative_path(root, unit.source, desc="preproc", suffix="T1w")
            mask = derivative_path(root, unit.source, desc="brain", suffix="mask")
            if t1w.is_file() and mask.is_file():
                found = (t1w, mask)
                break
        if found is None:
            no_derivs.append(unit.source.prefix)
            continue
        records.append(ScanRecord(key=unit.source.prefix, participant=unit.source.subject,
                                  t1w=found[0], mask=found[1], age=float(unit.info.age),
                                  sex=unit.info.sex, site=unit.info.site))
    if no_age:
        LOGGER.warning("%d scan(s) without an age skipped (e.g. %s)", len(no_age), no_age[0])
    if no_derivs:
        LOGGER.warning("%d scan(s) without brainage derivatives in %s skipped (e.g. %s); run "
                       "`brainage %s <out> participant` first", len(no_derivs),
                       ", ".join(map(str, derivatives)), no_derivs[0], bids_dir)
    if not records:
        raise InputMissingError(f"no T1w in {bids_dir} has both an age and participant-level "
                                f"derivatives in {', '.join(map(str, derivatives))}")
    LOGGER.info("training data: %d scans of %d participants", len(records),
                len({r.participant for r in records}))
    return records


def _fingerprint(record: ScanRecord, tag: str) -> str:
    parts = [tag]
    for path in (record.t1w, record.mask):
        stat = path.stat()
        parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class InputCache:
    """Prepared network inputs of every scan, in memory and on disk.

    Parameters
    ----------
    folder : Path
        Cache folder (created).
    tag : str
        Identifies the family and its input parameters; a change invalidates the cache.
    prepare : callable
        ``prepare(record) -> list of ndarray`` (one array per view, e.g. slicing offset).
    """

    def __init__(self, folder: Path, tag: str, prepare: Callable[[ScanRecord], list[np.ndarray]]):
        self.folder = Path(folder)
        self.tag = tag
        self._prepare = prepare
        self._views: dict[str, list[np.ndarray]] = {}

    def _file(self, record: ScanRecord) -> Path:
        return self.folder / f"{record.key}_{_fingerprint(record, self.tag)}.npz"

    def load(self, records: Sequence[ScanRecord], progress: bool = False) -> None:
        """Prepare (or read from disk) the inputs of ``records``."""
        from tqdm.auto import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        for record in tqdm(records, desc="preparing inputs", disable=not progress, leave=False):
            if record.key in self._views:
                continue
            path = self._file(record)
            if path.is_file():
                with np.load(path) as stored:
                    views = [stored[f"view{i}"] for i in range(len(stored.files))]
            else:
                views = [np.asarray(v, dtype=np.float16) for v in self._prepare(record)]
                tmp = path.with_suffix(".part.npz")
                np.savez_compressed(tmp, **{f"view{i}": v for i, v in enumerate(views)})
                tmp.replace(path)
            self._views[record.key] = views

    def views(self, key: str) -> list[np.ndarray]:
        """Prepared views of one scan (float16 arrays)."""
        try:
            return self._views[key]
        except KeyError:
            raise KeyError(f"scan {key} was not loaded into the input cache") from None

    def write_manifest(self) -> None:
        """List the cached scans (for humans)."""
        manifest = {key: len(v) for key, v in sorted(self._views.items())}
        (self.folder / "manifest.json").write_text(json.dumps({"tag": self.tag, "views": manifest},
                                                              indent=1))
