"""Run a models workflow into the brain-age sink, as inside the participant workflow (no
preprocessing). Importable by name (never import from 'conftest')."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["run_models_into_sink"]


def run_models_into_sink(models_wf, tmp_path: Path, subject: str, age: float,
                         raw_t1w: str | Path | None = None) -> Path:
    """Connect ``models_wf`` (inputs and models_dir set) to a ``BrainAgeSink`` and run both.

    Parameters
    ----------
    models_wf : nipype Workflow
        From :func:`bidsapp.workflows.models.init_models_wf`.
    tmp_path : Path
        Holds ``raw/`` (the source T1w), ``work/`` and ``out/``.
    subject : str
        Participant label of the source T1w ``sub-<subject>_T1w.nii.gz``.
    age : float
        Chronological age given to the sink.
    raw_t1w : path, optional
        Copied as the source T1w; default: a placeholder file (only its name matters).

    Returns
    -------
    Path
        ``out/sub-<subject>/anat``.
    """
    from nipype.pipeline import engine as pe

    from bidsapp.interfaces.bids import BrainAgeSink

    relpath = f"sub-{subject}/anat/sub-{subject}_T1w.nii.gz"
    raw = tmp_path / "raw" / relpath
    raw.parent.mkdir(parents=True)
    if raw_t1w is None:
        raw.write_bytes(b"placeholder")
    else:
        shutil.copy(raw_t1w, raw)
    out = tmp_path / "out"
    wf = pe.Workflow(name="wf", base_dir=str(tmp_path / "work"))
    sink = pe.Node(BrainAgeSink(base_directory=str(out), source_file=str(raw), relpath=relpath,
                                scan_info=json.dumps({"age": age})), name="ds_brainage")
    wf.connect(models_wf, "outputnode.predictions", sink, "predictions")
    wf.run()
    return out / f"sub-{subject}" / "anat"


def tampered_copy(models: Path, target: Path, model_id: str, entry: int = 1) -> Path:
    """Copy the models folder ``models`` to ``target`` and flip one byte in the middle of the
    weight file of the ``entry``-th weights entry of ``model_id``'s card; returns ``target``."""
    from bidsapp.inference.registry import read_card

    shutil.copytree(models, target)
    card, folder = read_card(model_id, target)
    weights = folder / card["weights"][entry]["file"]
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    return target
