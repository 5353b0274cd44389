"""The one place that names and writes BIDS-Derivatives.

Every output path is built here from the source T1w's entities (never by joining strings
elsewhere), and every file is written atomically: it is written under a temporary name in
the destination directory and renamed into place with :func:`os.replace`, so an interrupted
run never leaves a half-written derivative and concurrent participant jobs writing into one
output directory never see each other's partial files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

from . import __version__
from .config import MODEL_IDS
from .errors import NotWritableError

__all__ = [
    "APP_NAME",
    "TEMPLATE_SPACE",
    "BRAINAGE_COLUMNS",
    "SourceEntities",
    "derivative_path",
    "atomic_write",
    "atomic_copy",
    "write_json",
    "write_dataset_description",
    "write_bidsignore",
    "write_brainage_table",
    "write_model_derivatives",
    "brainage_dictionary",
    "bids_uri",
    "write_anat_derivatives",
    "DSEG_LABELS",
    "TISSUES",
]

APP_NAME = "brainage"
TEMPLATE_SPACE = "MNI152NLin2009aSym"
#: Where the template of :data:`TEMPLATE_SPACE` is described (the ``SpatialReference`` of its images).
TEMPLATE_URL = "https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009"
BIDS_VERSION = "1.10.0"

# Entities of the source T1w kept in derivative names, in the order BIDS prescribes.
_SOURCE_ENTITIES = (("sub", "subject"), ("ses", "session"), ("acq", "acquisition"),
                    ("ce", "ceagent"), ("rec", "reconstruction"), ("run", "run"))
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_ENTITY_RE = re.compile(r"(?:^|_)(sub|ses|acq|ce|rec|run)-([A-Za-z0-9]+)")

# errno values of a full disk or quota: the output cannot be written, through no bug.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

BRAINAGE_COLUMNS = ("model", "brain_age", "brain_age_lower", "brain_age_upper", "age", "brain_pad")


def _check_label(name: str, value: str | None) -> None:
    if value is not None and not _LABEL_RE.match(str(value)):
        raise ValueError(f"BIDS label for '{name}' must be alphanumeric, got {value!r}")


@dataclass(frozen=True)
class SourceEntities:
    """Entities of one source T1w that every derivative of it inherits.

    Parameters
    ----------
    subject : str
        Participant label without ``sub-``.
    session, acquisition, ceagent, reconstruction, run : str or None
        Optional entity labels without their prefixes.

    Examples
    --------
    >>> src = SourceEntities.from_path("sub-01/ses-A/anat/sub-01_ses-A_run-2_T1w.nii.gz")
    >>> src.prefix
    'sub-01_ses-A_run-2'
    """

    subject: str
    session: str | None = None
    acquisition: str | None = None
    ceagent: str | None = None
    reconstruction: str | None = None
    run: str | None = None

    def __post_init__(self) -> None:
        for _, name in _SOURCE_ENTITIES:
            _check_label(name, getattr(self, name))

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "SourceEntities":
        """Parse the entities from a BIDS file name."""
        name = Path(path).name
        found = dict(_ENTITY_RE.findall(name.split(".")[0]))
        if "sub" not in found:
            raise ValueError(f"not a BIDS file name (no sub- entity): {name}")
        return cls(**{attr: found.get(key) for key, attr in _SOURCE_ENTITIES})

    @property
    def prefix(self) -> str:
        """``sub-<l>[_ses-<l>][_acq-<l>][_ce-<l>][_rec-<l>][_run-<i>]``."""
        return "_".join(f"{key}-{getattr(self, attr)}" for key, attr in _SOURCE_ENTITIES
                        if getattr(self, attr) is not None)

    @property
    def unit_id(self) -> str:
        """A short identifier of this T1w, safe as a workflow or file name."""
        return self.prefix.replace("-", "_")

    def subject_dir(self, output_dir: str | os.PathLike) -> Path:
        """``output_dir/sub-<l>[/ses-<l>]``."""
        out = Path(output_dir) / f"sub-{self.subject}"
        return out / f"ses-{self.session}" if self.session else out


def derivative_path(output_dir: str | os.PathLike, source: SourceEntities, *, suffix: str,
                    extension: str = ".nii.gz", space: str | None = None, res: str | None = None,
                    label: str | None = None, desc: str | None = None, from_: str | None = None,
                    to: str | None = None, mode: str | None = None,
                    datatype: str = "anat") -> Path:
    """Path of one derivative, named as sMRIPrep names it.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset.
    source : SourceEntities
        Entities of the source T1w.
    suffix : str
        BIDS suffix (``T1w``, ``mask``, ``probseg``, ``dseg``, ``xfm``, ``brainage`` …).
    extension : str
        File extension including the leading dot.
    space, res, label, desc, from_, to, mode : str or None
        Optional entities, written in BIDS order (``from``/``to``/``mode`` are the
        NiPreps transform entities).
    datatype : str
        Sub-folder of the subject (or session) directory (``anat`` or ``figures``).

    Examples
    --------
    >>> src = SourceEntities(subject="01", session="A")
    >>> derivative_path("/out", src, space="MNI152NLin2009aSym", res="2", label="GM",
    ...                 desc="modulated", suffix="probseg").as_posix()
    '/out/sub-01/ses-A/anat/sub-01_ses-A_space-MNI152NLin2009aSym_res-2_label-GM_desc-modulated_probseg.nii.gz'
    """
    for name, value in (("space", space), ("res", res), ("label", label), ("desc", desc),
                        ("from", from_), ("to", to), ("mode", mode), ("suffix", suffix)):
        _check_label(name, value)
    if not extension.startswith("."):
        raise ValueError(f"extension must start with '.', got {extension!r}")
    parts = [source.prefix]
    for key, value in (("from", from_), ("to", to), ("mode", mode), ("space", space),
                       ("res", res), ("label", label), ("desc", desc)):
        if value is not None:
            parts.append(f"{key}-{value}")
    return source.subject_dir(output_dir) / datatype / ("_".join(parts) + f"_{suffix}{extension}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : path
        Final destination; parent directories are created.
    mode : {'wb', 'w'}
        Binary or text (UTF-8, ``\\n`` newlines) mode.

    Raises
    ------
    NotWritableError
        When the disk or quota is full or the file system is read-only (or the file cannot be
        created for lack of permission); the message names ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc, creating=True) from exc
    try:
        kwargs = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        error = _write_error(path, exc) if isinstance(exc, OSError) else exc
        if error is not exc:
            raise error from exc
        raise


def _write_error(path: Path, exc: OSError, *, creating: bool = False) -> OSError:
    """A full disk, a quota or a read-only file system (and, while creating the file, a
    permission error) as one line naming the file (exit 73); other errors unchanged."""
    if exc.errno in _NO_SPACE:
        advice = "free disk space or raise the quota (or choose another output/work dir)"
    elif exc.errno == errno.EROFS or creating and exc.errno in (errno.EACCES, errno.EPERM):
        advice = "choose a writable output/work dir (bind it read-write in a container)"
    else:
        return exc
    return NotWritableError(f"{path} could not be written ({exc.strerror}): {advice}, then rerun; "
                            "finished files are kept, nothing is left half-written")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (temporary name, then rename)."""
    with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)
    return Path(dst)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | os.PathLike, content: Mapping[str, Any]) -> Path:
    """Write ``content`` as indented JSON, atomically."""
    text = json.dumps(content, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    with atomic_write(path, "w") as handle:
        handle.write(text + "\n")
    return Path(path)


def bids_uri(relative_path: str | os.PathLike, dataset: str = "raw") -> str:
    """A BIDS URI (``bids:raw:sub-01/anat/…``) for ``Sources`` fields."""
    return f"bids:{dataset}:{Path(relative_path).as_posix()}"


def write_dataset_description(output_dir: str | os.PathLike, bids_dir: str | os.PathLike,
                              *, container: Mapping[str, str] | None = None) -> Path:
    """Write the derivative ``dataset_description.json`` (idempotent, concurrency-safe).

    ``GeneratedBy`` carries this version; ``SourceDatasets`` and ``DatasetLinks`` point at
    the raw dataset, whose ``License`` and DOI are carried over when present.
    """
    bids_dir = Path(bids_dir)
    raw: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        raw = json.loads((bids_dir / "dataset_description.json").read_text(encoding="utf-8"))
    generated = {"Name": APP_NAME, "Version": __version__,
                 "CodeURL": "https://github.com/brainage/brainage",
                 "Description": "T1w preprocessing (ANTs, deepbet) and brain-age prediction"}
    if container:
        generated["Container"] = dict(container)
    source = {"URL": bids_dir.resolve().as_uri()}
    if raw.get("DatasetDOI"):
        source["DOI"] = raw["DatasetDOI"]
    desc: dict[str, Any] = {
        "Name": f"brainage derivatives of {raw.get('Name', bids_dir.name)}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
        "HowToAcknowledge": "Cite brainage and the seed papers listed in each report's methods section.",
    }
    if raw.get("License"):
        desc["License"] = raw["License"]
    return write_json(Path(output_dir) / "dataset_description.json", desc)


_BIDSIGNORE = ("*.html", "logs", "log", "figures", "*_xfm.*", "*_qc.json", "*_brainage.tsv",
               "*_brainage.json", "*_brainagemap.*", "*_relevancemap.*", "*_statmap.*",
               "*_brainpadmap.*", "*_brainagesdmap.*", "*_brainageroi.*",
               "*_inputslice.*", "*_reconslice.*", "*_reconerrorslice.*",
               "group_*", "desc-*_biasfit.json")


def write_bidsignore(output_dir: str | os.PathLike) -> Path:
    """Write ``.bidsignore`` listing the outputs that BIDS does not define yet."""
    with atomic_write(Path(output_dir) / ".bidsignore", "w") as handle:
        handle.write("\n".join(_BIDSIGNORE) + "\n")
    return Path(output_dir) / ".bidsignore"


def _format_cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    text = str(value)
    if "\t" in text or "\n" in text:
        raise ValueError(f"table cell may not contain tabs or newlines: {text!r}")
    return text


def brainage_dictionary() -> dict[str, Any]:
    """The JSON data dictionary of ``*_brainage.tsv`` (BIDS tabular-file sidecar)."""
    return {
        "model": {"LongName": "Model identifier",
                  "Description": "brainage model id (see the model card models/<id>/model_card.json)",
                  "Levels": {"local-unet": "seed 000 voxelwise U-Net (global = mean over brain)",
                             "diffusion-ae": "seed 001 semi-supervised diffusion autoencoder",
                             "mlens": "seed 002 multi-level CNN ensemble",
                             "vgg-cbv": "seed 003 3D VGG8 on T1w + synthesised CBV",
                             "densenet-clinical": "seed 004 3D DenseNet-169",
                             "ensemble": "mean of the models run"}},
        "brain_age": {"LongName": "Predicted brain age", "Units": "year",
                      "Description": "Brain age predicted from the T1w (no bias correction)"},
        "brain_age_lower": {"LongName": "Lower bound of the 95% interval", "Units": "year",
                            "Description": "2.5th percentile of the model's predictive distribution"},
        "brain_age_upper": {"LongName": "Upper bound of the 95% interval", "Units": "year",
                            "Description": "97.5th percentile of the model's predictive distribution"},
        "age": {"LongName": "Chronological age", "Units": "year",
                "Description": "Age at scan from scans.tsv, sessions.tsv or participants.tsv "
                               "(converted to years); n/a when unknown"},
        "brain_pad": {"LongName": "Brain-predicted age difference", "Units": "year",
                      "Description": "brain_age - age (uncorrected for regression to the mean); "
                                     "n/a when age is unknown"},
    }


def write_brainage_table(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                         provenance: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write a ``*_brainage.tsv`` (one row per model) and its ``.json`` dictionary.

    Parameters
    ----------
    path : path
        Destination ending in ``_brainage.tsv``.
    rows : sequence of mappings
        Each mapping holds exactly :data:`BRAINAGE_COLUMNS`; ``None``/NaN become ``n/a``.
        ``brain_pad`` is recomputed from ``brain_age`` and ``age`` so the two never disagree.
    provenance : mapping, optional
        Model id -> what produced that model's row (e.g. the branches and stack of
        ``vgg-cbv``); written to the sidecar as ``ModelProvenance``.
    """
    path = Path(path)
    if not path.name.endswith("_brainage.tsv"):
        raise ValueError(f"path must end with '_brainage.tsv', got {path.name}")
    lines = ["\t".join(BRAINAGE_COLUMNS)]
    for row in rows:
        unknown = set(row) - set(BRAINAGE_COLUMNS)
        if unknown:
            raise ValueError(f"unknown brainage columns {sorted(unknown)}; allowed: {BRAINAGE_COLUMNS}")
        values = dict(row)
        age, pred = values.get("age"), values.get("brain_age")
        known = all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in (age, pred))
        values["brain_pad"] = float(pred) - float(age) if known else None
        lines.append("\t".join(_format_cell(values.get(col)) for col in BRAINAGE_COLUMNS))
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    sidecar = brainage_dictionary()
    if provenance:
        sidecar["ModelProvenance"] = {str(k): dict(v) for k, v in provenance.items()}
    write_json(path.with_suffix(".json"), sidecar)
    return path


#: Tissue classes of the ``dseg`` image (fMRIPrep's convention) and of the probseg lists.
DSEG_LABELS = {1: "GM", 2: "WM", 3: "CSF"}
TISSUES = ("GM", "WM", "CSF")
_RESOLUTIONS = {"1p5": "1.5 mm isotropic grid over the MNI152NLin2009aSym template field of view",
                "2": "2 mm isotropic grid over the MNI152NLin2009aSym template field of view"}


def write_anat_derivatives(output_dir: str | os.PathLike, source: SourceEntities, relpath: str,
                           outputs: Mapping[str, Any], *, extra_qc: Mapping[str, Any] | None = None,
                           vbm_fwhm: float | None = None) -> list[Path]:
    """Copy one T1w's preprocessing results into the derivatives dataset, with sidecars.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset.
    source : SourceEntities
        Entities of the source T1w.
    relpath : str
        Path of the source T1w relative to the raw dataset (for ``Sources``).
    outputs : mapping
        The ``outputnode`` fields of :func:`bidsapp.workflows.anatomical.init_anat_preproc_wf`.
    extra_qc : mapping, optional
        Added to the ``*_qc.json`` (age lookup, run id …).
    vbm_fwhm : float, optional
        FWHM of the smoothed modulated maps, when they were made.

    Returns
    -------
    list of Path
        Every file written.
    """
    out = Path(output_dir)
    sources = [bids_uri(relpath)]
    written: list[Path] = []

    def put(src: Any, meta: Mapping[str, Any] | None = None, **name: Any) -> None:
        dst = derivative_path(out, source, **name)
        written.append(atomic_copy(src, dst))
        if meta is not None:
            sidecar = dst.with_name(dst.name.split(".")[0] + ".json")
            reference = TEMPLATE_URL if name.get("space") else sources[0]
            written.append(write_json(sidecar, {**meta, "Sources": sources,
                                                "SpatialReference": reference}))

    space = {"space": TEMPLATE_SPACE}
    put(outputs["t1w_preproc"], {"SkullStripped": False,
                                 "Description": "T1w reoriented to RAS, N4 bias-field corrected"},
        desc="preproc", suffix="T1w")
    put(outputs["t1w_mask"], {"Type": "Brain", "Description": "deepbet brain mask"},
        desc="brain", suffix="mask")
    put(outputs["t1w_dseg"], {"Description": "Tissue labels (argmax of the probsegs): "
                              + ", ".join(f"{k} {v}" for k, v in DSEG_LABELS.items())}, suffix="dseg")
    lut = derivative_path(out, source, suffix="dseg", extension=".tsv")
    with atomic_write(lut, "w") as handle:
        handle.write("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in DSEG_LABELS.items()))
    written.append(lut)
    for tissue, path in zip(TISSUES, outputs["t1w_tpms"]):
        put(path, {"Description": f"{tissue} probability (Atropos with template priors)"},
            label=tissue, suffix="probseg")
    put(outputs["anat2std_xfm"], None, from_="T1w", to=TEMPLATE_SPACE, mode="image",
        suffix="xfm", extension=".h5")
    put(outputs["std2anat_xfm"], None, from_=TEMPLATE_SPACE, to="T1w", mode="image",
        suffix="xfm", extension=".h5")
    res2 = {"Resolution": _RESOLUTIONS["2"]}
    put(outputs["std_t1w"], {**res2, "SkullStripped": True,
                             "Description": "Brain-masked N4-corrected T1w warped to the template"},
        **space, res="2", desc="preproc",
        suffix="T1w")
    put(outputs["std_mask"], {**res2, "Type": "Brain",
                              "Description": "deepbet brain mask warped to the template"},
        **space, res="2", desc="brain", suffix="mask")
    for tissue, path in zip(TISSUES, outputs["std_tpms"]):
        put(path, {**res2, "Description": f"{tissue} probability warped to the template"}, **space,
            res="2", label=tissue, suffix="probseg")
    mod_desc = ("{t} probability warped to the template and multiplied by the Jacobian determinant "
                "of the native-to-template mapping (affine and nonlinear): mL of {t} per mL of template "
                "(VBM 'modulated' map; values may exceed 1)")
    variants = [("res2", "2", "modulated", None), ("res1p5", "1p5", "modulated", None)]
    if vbm_fwhm:
        tag = f"modulatedsmooth{vbm_fwhm:g}".replace(".", "p")
        variants += [("res2_smooth", "2", tag, vbm_fwhm), ("res1p5_smooth", "1p5", tag, vbm_fwhm)]
    for key, res, desc, fwhm in variants:
        for tissue, path in zip(TISSUES[:2], outputs[f"std_mod_tpms_{key}"]):
            meta = {"Resolution": _RESOLUTIONS[res], "Description": mod_desc.format(t=tissue)}
            if fwhm:
                meta["SmoothingFWHM"] = fwhm
            put(path, meta, **space, res=res, label=tissue, desc=desc, suffix="probseg")
    qc = json.loads(Path(outputs["qc"]).read_text(encoding="utf-8"))
    qc.update(extra_qc or {})
    qc["source"] = relpath
    written.append(write_json(derivative_path(out, source, suffix="qc", extension=".json"), qc))
    return written


def write_model_derivatives(output_dir: str | os.PathLike, source: SourceEntities, relpath: str,
                            predictions: Sequence[Mapping[str, Any]], *,
                            age: float | None = None) -> list[Path]:
    """Write one T1w's brain-age table and the models' maps.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset.
    source : SourceEntities
        Entities of the source T1w.
    relpath : str
        Path of the source T1w relative to the raw dataset (for ``Sources``).
    predictions : sequence of mappings
        One per model, as written by the model interfaces (:mod:`bidsapp.interfaces.models`):
        ``model``, ``brain_age``, ``brain_age_lower``, ``brain_age_upper``, ``details`` and
        ``maps`` (each ``file``, ``suffix``, optional ``space``, ``res``, ``meta`` and
        ``extension``, default ``.nii.gz``; a ``.tsv`` gets its ``meta`` as data dictionary;
        a map in a ``space`` with a ``res`` gets that resolution's ``Resolution`` text, one
        without, such as the diffusion-ae slices, describes its grid in its own ``meta``),
        and optionally ``provenance`` (a mapping written to the table's sidecar under
        ``ModelProvenance.<model>``).
    age : float, optional
        Chronological age (years) for the ``age`` and ``brain_pad`` columns.

    Returns
    -------
    list of Path
        Every file written.

    Notes
    -----
    With two or more models an ``ensemble`` row (the mean of the models' brain ages) is added;
    it has no interval because the models' intervals measure different things.
    """
    out = Path(output_dir)
    sources = [bids_uri(relpath)]
    written: list[Path] = []
    rows, provenance = [], {}
    for pred in sorted(predictions, key=lambda p: MODEL_IDS.index(p["model"])):
        if pred.get("provenance"):
            provenance[pred["model"]] = pred["provenance"]
        rows.append({"model": pred["model"], "brain_age": pred["brain_age"],
                     "brain_age_lower": pred.get("brain_age_lower"),
                     "brain_age_upper": pred.get("brain_age_upper"), "age": age})
        for item in pred.get("maps", []):
            dst = derivative_path(out, source, space=item.get("space"), res=item.get("res"),
                                  desc=pred["model"].replace("-", ""), suffix=item["suffix"],
                                  extension=item.get("extension", ".nii.gz"))
            written.append(atomic_copy(item["file"], dst))
            meta = {**item.get("meta", {}), "Model": pred["model"], "Sources": sources,
                    "SpatialReference": TEMPLATE_URL if item.get("space") else sources[0]}
            if item.get("space") and item.get("res"):
                meta.setdefault("Resolution", _RESOLUTIONS.get(item["res"], ""))
            written.append(write_json(dst.with_name(dst.name.split(".")[0] + ".json"), meta))
    if len(rows) >= 2:
        rows.append({"model": "ensemble", "age": age,
                     "brain_age": float(sum(r["brain_age"] for r in rows) / len(rows))})
    if rows:
        written.append(write_brainage_table(
            derivative_path(out, source, suffix="brainage", extension=".tsv"), rows, provenance))
    return written
