"""The per-participant HTML quality-control report (``sub-<label>.html``).

The report is built only from the derivatives already written to ``output_dir`` (never
from the work directory), so it shows exactly what a user downloads.  Each T1w "unit"
(one source T1w: session/acquisition/run) gets a section with a summary table read from
its ``_qc.json``, figures (brain-mask outline, tissue segmentation, template contours on
the warped T1w, explanation maps when present) and its brain-age table when present; a unit
with a diffusion-ae result also gets that model's section (its Monte-Carlo dropout interval,
the SSIM and PSNR of the reconstruction, and the input slice, reconstruction and difference
side by side).
Figures go to ``sub-<label>/figures/`` and are linked by relative path, as in fMRIPrep.
"""

from __future__ import annotations

import datetime as _dt
import functools
import html
import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np

from .. import __version__
from ..derivatives import TEMPLATE_SPACE, SourceEntities, atomic_copy, atomic_write, derivative_path
from ..errors import InputMissingError, NotWritableError
from . import figures as _fig

__all__ = [
    "QC_NUMBERS",
    "find_units",
    "unit_summary",
    "summarize_units",
    "software_versions",
    "generate_participant_report",
]

LOGGER = logging.getLogger("brainage.reports.participant")

#: Numeric ``_qc.json`` keys shown in the summary table, with their display names.
QC_NUMBERS = {
    "mask_volume_ml": "Brain mask volume (mL)",
    "gm_volume_ml": "Grey matter volume (mL)",
    "wm_volume_ml": "White matter volume (mL)",
    "csf_volume_ml": "CSF volume (mL)",
    "registration_similarity": "Registration similarity",
}
_KNOWN_FLAGS = ("skull_stripped_input", "thick_slice", "anisotropic", "oblique")
_VERSION_DISTS = (("ANTs (antspyx)", "antspyx"), ("nipype", "nipype"), ("nibabel", "nibabel"),
                  ("nilearn", "nilearn"), ("PyTorch", "torch"), ("deepbet", "deepbet"))
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_RES = "2"  # resolution entity of the template-space derivatives
_MAP_SUFFIXES = {"relevancemap": "relevance", "brainagemap": "voxel-wise brain age (years)",
                 "brainpadmap": "voxel-wise brain-PAD (years)"}
#: desc labels of models whose relevance map is a top-20 % Grad-CAM map (seed 003 vgg-cbv)
_GRADCAM_MODELS = ("vggcbv",)
#: desc label and slice suffixes of the diffusion-ae reconstruction (seed 001)
_DIFFUSION_AE_DESC = "diffusionae"
_DIFFUSION_AE_SLICES = ("inputslice", "reconslice", "reconerrorslice")


# --------------------------------------------------------------------------- inputs


@dataclass
class _UnitFiles:
    """Paths of the derivatives of one unit and which of them are missing."""

    source: SourceEntities
    paths: dict[str, Path]
    missing: list[str] = field(default_factory=list)

    def get(self, key: str) -> Path | None:
        path = self.paths.get(key)
        return path if path is not None and path.is_file() else None


_EXPECTED = (
    # key, description, derivative_path keywords
    ("preproc", "preprocessed T1w", dict(suffix="T1w", desc="preproc")),
    ("mask", "brain mask", dict(suffix="mask", desc="brain")),
    ("dseg", "tissue segmentation", dict(suffix="dseg")),
    ("GM", "GM probability map", dict(suffix="probseg", label="GM")),
    ("WM", "WM probability map", dict(suffix="probseg", label="WM")),
    ("CSF", "CSF probability map", dict(suffix="probseg", label="CSF")),
    ("mni_preproc", "T1w in template space",
     dict(suffix="T1w", desc="preproc", space=TEMPLATE_SPACE, res=_RES)),
    ("mni_mask", "brain mask in template space",
     dict(suffix="mask", desc="brain", space=TEMPLATE_SPACE, res=_RES)),
    ("qc", "QC measures", dict(suffix="qc", extension=".json")),
)


def _unit_files(output_dir: Path, source: SourceEntities) -> _UnitFiles:
    paths = {key: derivative_path(output_dir, source, **kw) for key, _, kw in _EXPECTED}
    paths["brainage"] = derivative_path(output_dir, source, suffix="brainage", extension=".tsv")
    files = _UnitFiles(source, paths)
    files.missing = [f"{desc} ({paths[key].name})" for key, desc, _ in _EXPECTED
                     if not paths[key].is_file()]
    return files


def _explanation_maps(output_dir: Path, source: SourceEntities) -> list[Path]:
    anat = source.subject_dir(output_dir) / "anat"
    found = []
    for suffix in _MAP_SUFFIXES:
        # template-space maps only: the figure draws them over the MNI-space T1w
        for path in sorted(anat.glob(f"{source.prefix}_*space-*_{suffix}.nii*")):
            # A glob on 'sub-01_*' also matches 'sub-01_run-2_*': keep this unit's files only.
            if SourceEntities.from_path(path).prefix == source.prefix:
                found.append(path)
    return found


def _check_subject(subject: str) -> str:
    if not isinstance(subject, str):
        raise TypeError(f"subject must be a str, got {type(subject).__name__}")
    label = subject[4:] if subject.startswith("sub-") else subject
    if not _LABEL_RE.match(label):
        raise ValueError(f"subject must be an alphanumeric BIDS label, got {subject!r}")
    return label


def _check_output_dir(output_dir: str | os.PathLike) -> Path:
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir must be a path, got {type(output_dir).__name__}")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputMissingError(f"output_dir does not exist: {output_dir}")
    return output_dir


def find_units(output_dir: str | os.PathLike, subject: str) -> list[SourceEntities]:
    """The T1w units of a participant that have any derivative in ``output_dir``.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset.
    subject : str
        Participant label, with or without ``sub-``.

    Returns
    -------
    list of SourceEntities
        Sorted by session, acquisition, contrast agent, reconstruction and run.
    """
    label = _check_subject(subject)
    output_dir = _check_output_dir(output_dir)
    sub_dir = output_dir / f"sub-{label}"
    units: dict[str, SourceEntities] = {}
    for anat in [sub_dir / "anat", *sorted(sub_dir.glob("ses-*/anat"))]:
        if not anat.is_dir():
            continue
        for path in anat.iterdir():
            if not path.name.startswith(f"sub-{label}_"):
                continue
            try:
                source = SourceEntities.from_path(path)
            except ValueError:
                LOGGER.debug("ignoring %s: not a BIDS name", path)
                continue
            if source.subject == label:
                units.setdefault(source.prefix, source)
    return sorted(units.values(), key=_unit_sort_key)


def _unit_sort_key(source: SourceEntities) -> tuple:
    run = source.run or ""
    return (source.session or "", source.acquisition or "", source.ceagent or "",
            source.reconstruction or "", run.zfill(8) if run.isdigit() else run)


def _read_qc(path: Path | None) -> tuple[dict[str, Any], str | None]:
    """The ``_qc.json`` content, and a problem description when it cannot be used."""
    if path is None:
        return {}, None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {}, f"cannot read {path.name}: {exc}"
    if not isinstance(content, dict):
        return {}, f"{path.name} does not hold a JSON object"
    return content, None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _flags(qc: Mapping[str, Any]) -> list[str]:
    """Names of the flags set in a ``_qc.json`` (top-level booleans or a ``flags`` entry)."""
    names = [key for key, value in qc.items() if value is True]
    extra = qc.get("flags")
    if isinstance(extra, Mapping):
        names += [str(key) for key, value in extra.items() if value]
    elif isinstance(extra, (list, tuple)):
        names += [str(item) for item in extra]
    return list(dict.fromkeys(names))


def _warnings(qc: Mapping[str, Any]) -> list[str]:
    """Image warnings, then the scan's own (age missing, censored, outside a model's range)."""
    out: list[str] = []
    info = qc.get("scan_info")
    for value in (qc.get("warnings", []), info.get("warnings", []) if isinstance(info, Mapping) else []):
        if isinstance(value, str):
            value = [value]
        out += [str(item) for item in value] if isinstance(value, (list, tuple)) else []
    return list(dict.fromkeys(out))


def _timings(qc: Mapping[str, Any]) -> dict[str, float]:
    """Seconds per stage: the first dict of plain numbers in the QC file."""
    for key in ("seconds", "seconds_per_stage", "timings", "runtime_seconds"):
        value = qc.get(key)
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items() if _number(v) is not None}
    for key, value in qc.items():
        if isinstance(value, Mapping) and value and key != "flags" and all(
                _number(v) is not None for v in value.values()):
            return {str(k): float(v) for k, v in value.items()}
    return {}


def unit_summary(output_dir: str | os.PathLike, source: SourceEntities | str | os.PathLike
                 ) -> dict[str, Any]:
    """The QC numbers of one T1w unit as a flat dict (one table row).

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset.
    source : SourceEntities or path
        The unit, or any file name carrying its entities.

    Returns
    -------
    dict
        ``unit`` (entity prefix), the source entities (``subject``, ``session``,
        ``acquisition``, ``ceagent``, ``reconstruction``, ``run``; ``None`` when absent),
        ``complete`` (all expected derivatives present), ``missing`` (list of str), the
        numbers of :data:`QC_NUMBERS` (``None`` when unknown),
        ``registration_similarity_metric`` (str or ``None``), ``flags`` and ``warnings``
        (lists of str) and ``seconds`` (dict stage -> seconds).

    Examples
    --------
    >>> rows = [unit_summary(out, u) for u in find_units(out, "01")]   # doctest: +SKIP
    >>> best = max(rows, key=lambda r: -r["registration_similarity"])  # doctest: +SKIP
    """
    output_dir = _check_output_dir(output_dir)
    if not isinstance(source, SourceEntities):
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be SourceEntities or a path, got {type(source).__name__}")
        source = SourceEntities.from_path(source)
    files = _unit_files(output_dir, source)
    qc, problem = _read_qc(files.get("qc"))
    warnings = _warnings(qc)
    if problem:
        warnings.append(problem)
    row: dict[str, Any] = {"unit": source.prefix}
    for name in ("subject", "session", "acquisition", "ceagent", "reconstruction", "run"):
        row[name] = getattr(source, name)
    row["complete"] = not files.missing
    row["missing"] = list(files.missing)
    for key in QC_NUMBERS:
        row[key] = _number(qc.get(key))
    metric = qc.get("registration_similarity_metric")
    row["registration_similarity_metric"] = None if metric is None else str(metric)
    row["flags"] = _flags(qc)
    row["warnings"] = warnings
    row["seconds"] = _timings(qc)
    return row


def summarize_units(output_dir: str | os.PathLike, subject: str) -> list[dict[str, Any]]:
    """:func:`unit_summary` of every unit of a participant (see :func:`find_units`)."""
    return [unit_summary(output_dir, unit) for unit in find_units(output_dir, subject)]


def software_versions(extra_versions: Mapping[str, str] | None = None) -> dict[str, str]:
    """Versions of brainage and the libraries that shape its numbers.

    Parameters
    ----------
    extra_versions : mapping or None
        More ``{name: version}`` entries (e.g. model weights); they override defaults.

    Returns
    -------
    dict
        ``{display name: version}``; ``'not installed'`` for a missing distribution.
    """
    versions = {"brainage": __version__}
    for name, dist in _VERSION_DISTS:
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["Python"] = platform.python_version()
    if extra_versions is not None:
        if not isinstance(extra_versions, Mapping):
            raise TypeError("extra_versions must be a mapping of name -> version")
        versions.update({str(k): str(v) for k, v in extra_versions.items()})
    return versions


# --------------------------------------------------------------------------- figures


@functools.lru_cache(maxsize=1)
def _template() -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image]:
    """2 mm template T1w, brain mask and WM probability (the space of the warped T1w).

    nilearn's bundled ICBM 2009a symmetric files: nothing is downloaded.
    """
    from nilearn import datasets

    return (datasets.load_mni152_template(resolution=2),
            datasets.load_mni152_brain_mask(resolution=2),
            datasets.load_mni152_wm_template(resolution=2))


def _label_img(dseg: nib.spatialimages.SpatialImage, labels: Sequence[int]) -> nib.Nifti1Image:
    data = np.isin(np.asanyarray(dseg.dataobj), labels).astype(np.uint8)
    return nib.Nifti1Image(data, dseg.affine)


def _t1w_range(t1w: nib.spatialimages.SpatialImage | Path,
               mask: nib.spatialimages.SpatialImage | Path | None) -> tuple[float, float]:
    # Brain-only percentiles, with headroom so white matter is not clipped to flat white.
    try:
        vmin, vmax = _fig.robust_range(t1w, mask)
    except ValueError:  # mask on another grid
        vmin, vmax = _fig.robust_range(t1w)
    return vmin, vmin + 1.1 * (vmax - vmin)


def _fig_path(output_dir: Path, source: SourceEntities, **entities: str) -> Path:
    # All figures of a participant live in sub-<label>/figures/, sessions included (fMRIPrep).
    name = derivative_path(output_dir, source, extension=".svg", datatype="figures",
                           **entities).name
    return output_dir / f"sub-{source.subject}" / "figures" / name


@dataclass
class _Figure:
    """A rendered figure (or the reason it is missing) and its caption."""

    title: str
    caption: str
    path: Path | None = None
    alt_path: Path | None = None
    error: str | None = None


def _render(title: str, caption: str, make: Callable[[], tuple[Path, Path | None]]) -> _Figure:
    try:
        path, alt = make()
    except Exception as exc:  # noqa: BLE001 - one broken image must not cost the whole report
        LOGGER.warning("figure '%s' failed: %s", title, exc, exc_info=True)
        return _Figure(title, caption, error=f"{type(exc).__name__}: {exc}")
    return _Figure(title, caption, path=path, alt_path=alt)


class _Images:
    """Loads each derivative once per unit: figures reuse them, and a compressed 0.8 mm
    image costs seconds to decompress each time it is read from disk."""

    def __init__(self) -> None:
        self._cache: dict[Path, nib.Nifti1Image] = {}

    def __call__(self, path: Path | None) -> nib.Nifti1Image | None:
        if path is None:
            return None
        if path not in self._cache:
            img = _fig.load_3d(path)
            self._cache[path] = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
        return self._cache[path]


#: Figures that do not depend on the participant, once drawn in this process.
_TEMPLATE_FIGURE: dict[str, Path] = {}


def _unit_figures(output_dir: Path, files: _UnitFiles, similarity: str) -> list[_Figure]:
    source, out, load = files.source, [], _Images()
    preproc, mask, dseg = files.get("preproc"), files.get("mask"), files.get("dseg")
    if preproc is not None and mask is not None:
        def brainmask() -> tuple[Path, None]:
            t1w, brain = load(preproc), load(mask)
            vmin, vmax = _t1w_range(t1w, brain)
            fig = _fig.plot_mosaic(t1w, cuts=_fig.cuts_from_mask(brain), vmin=vmin, vmax=vmax,
                                   crop_mask=brain,
                                   contours=[_fig.Contour(brain, "red", "brain mask")])
            return _fig.save_figure(fig, _fig_path(output_dir, source, desc="brainmask",
                                                   suffix="T1w")), None
        out.append(_render(
            "Brain mask", "Brain mask (red outline) on the bias-corrected T1w in native space. "
            "The outline should follow the outer surface of the brain: no cortex cut off, no "
            "skull, dura, eyes or neck included.", brainmask))
    if preproc is not None and dseg is not None:
        def segmentation() -> tuple[Path, None]:
            labels, t1w, brain = load(dseg), load(preproc), load(mask)
            region = brain if brain is not None else _label_img(labels, (1, 2, 3))
            vmin, vmax = _t1w_range(t1w, brain)
            contours = [_fig.Contour(_label_img(labels, (1, 2)), "yellow",
                                     "grey matter (outer edge)"),
                        _fig.Contour(_label_img(labels, (2,)), "deepskyblue", "white matter")]
            if brain is not None:
                contours.insert(0, _fig.Contour(brain, "red", "brain mask"))
            fig = _fig.plot_mosaic(t1w, cuts=_fig.cuts_from_mask(region), vmin=vmin,
                                   vmax=vmax, crop_mask=region, contours=contours)
            return _fig.save_figure(fig, _fig_path(output_dir, source, desc="segmentation",
                                                   suffix="dseg")), None
        out.append(_render(
            "Tissue segmentation", "Tissue classes on the bias-corrected T1w: white matter "
            "(blue outline) and the outer edge of grey matter (yellow); CSF is what lies between "
            "the yellow outline and the brain mask (red), plus the ventricles. Check that the "
            "blue line follows the grey/white boundary and the yellow line the pial surface.",
            segmentation))
    mni = files.get("mni_preproc")
    if mni is not None:
        def registration() -> tuple[Path, Path]:
            t1w, brain, wm = _template()
            cuts = _fig.cuts_from_mask(brain)
            contours = [_fig.Contour(brain, "red", "template brain outline"),
                        _fig.Contour(wm, "deepskyblue", "template white matter")]
            warped = load(mni)
            vmin, vmax = _t1w_range(warped, load(files.get("mni_mask")))
            fig = _fig.plot_mosaic(warped, cuts=cuts, contours=contours, vmin=vmin, vmax=vmax,
                                   crop_mask=brain, crop_margin_mm=6)
            main = _fig.save_figure(fig, _fig_path(output_dir, source, space=TEMPLATE_SPACE,
                                                   desc="registration", suffix="T1w"))
            alt = _fig_path(output_dir, source, space=TEMPLATE_SPACE, desc="registrationref",
                            suffix="T1w")
            drawn = _TEMPLATE_FIGURE.get("registrationref")
            if drawn is not None and drawn.is_file():
                # the template figure is the same for every participant: draw it once per process
                for stale in (alt.with_suffix(".svg"), alt.with_suffix(".png")):
                    stale.unlink(missing_ok=True)
                return main, atomic_copy(drawn, alt.with_suffix(drawn.suffix))
            vmin, vmax = _t1w_range(t1w, brain)
            fig = _fig.plot_mosaic(t1w, cuts=cuts, contours=contours, vmin=vmin, vmax=vmax,
                                   crop_mask=brain, crop_margin_mm=6)
            alt = _fig.save_figure(fig, alt)
            _TEMPLATE_FIGURE["registrationref"] = alt
            return main, alt
        out.append(_render(
            f"Registration to {TEMPLATE_SPACE}",
            "The T1w warped to the template (2 mm), with the template's brain outline (red) and "
            "white-matter boundary (blue) drawn on top; hover to see the template itself under "
            "the same outlines. Sulci, ventricles and the brain edge should line up with the "
            f"outlines. {similarity}", registration))
    for path in _explanation_maps(output_dir, source):
        out.append(_explanation_figure(output_dir, source, path, load(mni)))
    return out


def _explanation_figure(output_dir: Path, source: SourceEntities, path: Path,
                        mni: nib.Nifti1Image | None) -> _Figure:
    name = path.name.split(".")[0]
    suffix = name.rsplit("_", 1)[1]
    desc = re.search(r"_desc-([A-Za-z0-9]+)_", name)
    model = desc.group(1) if desc else "model"
    if suffix == "relevancemap" and model in _GRADCAM_MODELS:
        return _gradcam_figure(output_dir, source, path, mni, model)
    label = _MAP_SUFFIXES.get(suffix, suffix)
    # relevance (LRP, guided backprop): symmetric range clipped at the 99th percentile of
    # |relevance| (seed 002), so white is zero and the few hottest voxels do not wash out the rest
    style = {"symmetric": True, "percentile": 99.0} if suffix == "relevancemap" else {}
    if suffix == "brainpadmap":  # signed years: white = brain age equal to age
        style = {"symmetric": True, "percentile": 99.0}

    def render() -> tuple[Path, None]:
        t1w, brain, _ = _template()
        background = mni if mni is not None else t1w
        vmin, vmax = _t1w_range(background, None) if mni is not None else (None, None)
        fig = _fig.plot_mosaic(background, cuts=_fig.cuts_from_mask(brain), vmin=vmin, vmax=vmax,
                               crop_mask=brain, crop_margin_mm=6,
                               overlay=_fig.Overlay(path, label=label, **style))
        target = output_dir / f"sub-{source.subject}" / "figures" / f"{name}.svg"
        return _fig.save_figure(fig, target), None

    caption = (f"{label.capitalize()} of model '{model}' ({path.name}) over the T1w in template "
               "space. Values are colour-coded; voxels equal to zero are transparent."
               + (" Symmetric colour range: ±the 99th percentile of |relevance|; red is positive "
                  "(pushes the predicted age up), blue negative." if suffix == "relevancemap"
                  else "")
               + (" Symmetric colour range: ±the 99th percentile of |brain-PAD|; red: locally "
                  "older-appearing than the chronological age, blue: younger (not corrected for "
                  "regression to the mean)." if suffix == "brainpadmap" else ""))
    return _render(f"Explanation map: {model} ({suffix})", caption, render)


def _gradcam_figure(output_dir: Path, source: SourceEntities, path: Path,
                    mni: nib.Nifti1Image | None, model: str) -> _Figure:
    """Slices of a top-20 % Grad-CAM map (seed 003) over the T1w in template space.

    Per view, the middle cut is the slice with the largest area of kept voxels (the paper's
    choice, :func:`bidsapp.explain.gradcam.max_area_slices`), flanked by cuts 10 and 20 mm away.
    """
    name = path.name.split(".")[0]

    def render() -> tuple[Path, None]:
        from ..explain.gradcam import max_area_slices

        t1w, brain, _ = _template()
        cam = _fig.load_3d(path)
        centre = nib.affines.apply_affine(cam.affine, max_area_slices(np.asanyarray(cam.dataobj)))
        box = _fig.cuts_from_mask(brain, 2, margin=0.0)  # the brain's extent per axis
        cuts = {axis: [round(float(np.clip(centre[i] + step, *box[axis])), 1)
                       for step in (-20, -10, 0, 10, 20)]
                for i, axis in enumerate(("x", "y", "z"))}
        background = mni if mni is not None else t1w
        vmin, vmax = _t1w_range(background, None) if mni is not None else (None, None)
        fig = _fig.plot_mosaic(background, cuts=cuts, vmin=vmin, vmax=vmax, crop_mask=brain,
                               crop_margin_mm=6,
                               overlay=_fig.Overlay(path, cmap="hot", vmin=0.0, percentile=99.0,
                                                    label="Grad-CAM (top 20 %)"))
        target = output_dir / f"sub-{source.subject}" / "figures" / f"{name}.svg"
        return _fig.save_figure(fig, target), None

    caption = (f"Grad-CAM map of model '{model}' ({path.name}): the last convolution block of the "
               "T1w encoder, mean over the fold networks, with only the top 20 % of its values "
               "inside the brain kept (Jomsky et al.), over the T1w in template space. Brighter "
               "is larger; other voxels are transparent. Middle column: per view, the slice with "
               "the largest area of kept voxels; the others lie 10 and 20 mm to either side.")
    return _render(f"Explanation map: {model} (Grad-CAM)", caption, render)


# --------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _similarity_text(row: Mapping[str, Any]) -> str:
    value = row.get("registration_similarity")
    if value is None:
        return ""
    metric = row.get("registration_similarity_metric") or "metric not recorded"
    return f"Similarity to the template: {value:.4f} ({metric})."


def _status(row: Mapping[str, Any]) -> tuple[str, str]:
    if not row["complete"]:
        return "incomplete", "fail"
    if row["warnings"]:
        return "warnings", "warn"
    return "complete", "ok"


def _html_summary_table(row: Mapping[str, Any]) -> str:
    lines = ["<table class=\"meta\">"]
    for key, title in QC_NUMBERS.items():
        digits = 4 if key == "registration_similarity" else 1
        value = _fmt(row[key], digits)
        if key == "registration_similarity" and row["registration_similarity_metric"]:
            value += f" ({_e(row['registration_similarity_metric'])})"
        lines.append(f"<tr><td>{_e(title)}</td><td>{value}</td></tr>")
    flags = ", ".join(row["flags"]) if row["flags"] else "none"
    lines.append(f"<tr><td>Flags</td><td>{_e(flags)}</td></tr>")
    if row["warnings"]:
        items = "".join(f"<li>{_e(w)}</li>" for w in row["warnings"])
        lines.append(f"<tr><td>Warnings</td><td><ul class=\"warnings\">{items}</ul></td></tr>")
    else:
        lines.append("<tr><td>Warnings</td><td>none</td></tr>")
    lines.append("</table>")
    if row["seconds"]:
        cells = "".join(f"<tr><td>{_e(k)}</td><td class=\"num\">{_fmt(v, 1)}</td></tr>"
                        for k, v in row["seconds"].items())
        lines.append("<details><summary>Processing time per stage (s)</summary>"
                     f"<table>{cells}</table></details>")
    return "\n".join(lines)


def _html_brainage(path: Path | None) -> str:
    if path is None:
        return ""
    # Imported here: pandas is only needed when a brain-age table exists.
    import pandas as pd

    head = "<h3>Brain age</h3>"
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError) as exc:
        return f"{head}<p class=\"missing\">Cannot read {_e(path.name)}: {_e(exc)}</p>"
    need = {"model", "brain_age"}
    if not need <= set(table.columns):
        return (f"{head}<p class=\"missing\">{_e(path.name)} lacks the columns "
                f"{_e(', '.join(sorted(need - set(table.columns))))}.</p>")

    def cell(record: Mapping[str, Any], key: str) -> float | None:
        value = record.get(key)
        return None if value is None or pd.isna(value) else float(value)

    rows = []
    for record in table.to_dict("records"):
        lower, upper = cell(record, "brain_age_lower"), cell(record, "brain_age_upper")
        interval = f"[{_fmt(lower)}, {_fmt(upper)}]" if lower is not None and upper is not None \
            else "n/a"
        rows.append(f"<tr><td>{_e(record['model'])}</td>"
                    f"<td class=\"num\">{_fmt(cell(record, 'brain_age'))}</td>"
                    f"<td class=\"num\">{interval}</td>"
                    f"<td class=\"num\">{_fmt(cell(record, 'age'))}</td>"
                    f"<td class=\"num\">{_fmt(cell(record, 'brain_pad'))}</td></tr>")
    return (f"{head}<table><tr><th>Model</th><th>Brain age (years)</th><th>95% interval</th>"
            "<th>Age (years)</th><th>Brain-PAD (years)</th></tr>" + "".join(rows) + "</table>"
            "<p>Brain-PAD = brain age &minus; age, not corrected for regression to the mean.</p>"
            + _html_provenance(path.with_suffix(".json")))


def _html_provenance(sidecar: Path) -> str:
    """What produced each row, from the table's sidecar (``ModelProvenance``: vgg-cbv's branches
    and stack); empty when the sidecar has none or cannot be read."""
    try:
        provenance = json.loads(sidecar.read_text(encoding="utf-8")).get("ModelProvenance", {})
    except (OSError, ValueError, AttributeError):
        return ""
    items = []
    for model, entry in provenance.items() if isinstance(provenance, dict) else ():
        # branches and stacks (vgg-cbv); diffusion-ae's numbers have a section of their own
        if not isinstance(entry, dict) or not {"Branches", "Stack"} & set(entry):
            continue
        text = f"{model}: branches {entry.get('Branches', '?')}, stack {entry.get('Stack', '?')}"
        notes = [str(n) for n in entry.get("Notes") or []]
        items.append(f"<li>{_e(text)}{_e('; ' + '; '.join(notes)) if notes else ''}</li>")
    return f"<ul class=\"provenance\">{''.join(items)}</ul>" if items else ""


def _read_provenance(sidecar: Path, model: str) -> dict[str, Any]:
    """``ModelProvenance.<model>`` of a ``_brainage.json`` ({} when absent or unreadable)."""
    try:
        entry = json.loads(sidecar.read_text(encoding="utf-8")).get("ModelProvenance", {})[model]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}
    return entry if isinstance(entry, dict) else {}


def _brainage_row(path: Path | None, model: str) -> dict[str, float | None]:
    """One model's ``brain_age``, ``brain_age_lower`` and ``brain_age_upper`` ({} if absent)."""
    if path is None:
        return {}
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError):
        return {}
    if "model" not in table.columns:
        return {}
    rows = table[table["model"] == model].to_dict("records")
    if not rows:
        return {}
    return {k: (None if pd.isna(rows[0].get(k)) else float(rows[0][k]))
            for k in ("brain_age", "brain_age_lower", "brain_age_upper") if k in rows[0]}


def _slice_data(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    data = np.asanyarray(img.dataobj).astype(float)
    return data[:, :, 0] if data.ndim == 3 and data.shape[2] == 1 else data


def _html_diffusion_ae(output_dir: Path, files: _UnitFiles) -> str:
    """The diffusion-ae section: brain age with its Monte-Carlo dropout interval, the
    reconstruction quality and the figure of the input slice, its reconstruction and their
    difference; empty when this unit has no diffusion-ae result."""
    source = files.source
    paths = {suffix: derivative_path(output_dir, source, space=TEMPLATE_SPACE,
                                     desc=_DIFFUSION_AE_DESC, suffix=suffix)
             for suffix in _DIFFUSION_AE_SLICES}
    table = files.get("brainage")
    provenance = _read_provenance(table.with_suffix(".json"), "diffusion-ae") if table else {}
    row = _brainage_row(table, "diffusion-ae")
    present = all(p.is_file() for p in paths.values())
    if not (row or provenance or present):
        return ""
    lines = ["<h3>Diffusion autoencoder (diffusion-ae)</h3>", "<table class=\"meta\">"]

    def add(name: str, value: str) -> None:
        lines.append(f"<tr><td>{_e(name)}</td><td>{_e(value)}</td></tr>")

    folds = provenance.get("Folds") or []
    if row.get("brain_age") is not None:
        add(f"Brain age (mean of {len(folds) or '?'} fold network(s))",
            f"{_fmt(row['brain_age'])} years")
    views = [v for v in provenance.get("ViewsZmm") or [] if _number(v) is not None]
    if views:
        add("Axial slices predicted from (MNI z)",
            f"{_fmt(views[0])} mm (medial)" + "".join(f", {_fmt(v)} mm" for v in views[1:]))
    samples = provenance.get("MCDropoutSamplesPerFold") or 0
    if row.get("brain_age_lower") is not None and row.get("brain_age_upper") is not None:
        how = (f"Monte-Carlo dropout of the age MLP, {samples} passes x {len(folds)} folds pooled"
               if samples else "spread of the fold networks")
        add(f"95% interval ({how})",
            f"[{_fmt(row['brain_age_lower'])}, {_fmt(row['brain_age_upper'])}] years")
    if _number(provenance.get("MCDropoutSD")) is not None:
        add("SD of the Monte-Carlo dropout passes", f"{_fmt(provenance['MCDropoutSD'], 2)} years")
    rec = provenance.get("Reconstruction") if isinstance(provenance.get("Reconstruction"),
                                                         dict) else {}
    if rec:
        where = f"fold {rec.get('Fold', '?')}, {rec.get('DDIMSteps', '?')} DDIM steps"
        if _number(rec.get("SSIM")) is not None:
            add(f"Reconstruction SSIM ({where})", _fmt(rec["SSIM"], 4))
        if "PSNR" in rec:  # null: an exact reconstruction (infinite PSNR)
            psnr = _number(rec["PSNR"])
            add("Reconstruction PSNR", "infinite (exact)" if psnr is None else f"{_fmt(psnr, 2)} dB")
        cv = rec.get("CrossValidation") if isinstance(rec.get("CrossValidation"), dict) else {}
        if _number(cv.get("ssim_mean")) is not None:
            text = f"SSIM {_fmt(cv['ssim_mean'], 4)} ± {_fmt(_number(cv.get('ssim_sd')), 4)}"
            if _number(cv.get("psnr_db_mean")) is not None:
                text += (f", PSNR {_fmt(cv['psnr_db_mean'], 2)} ± "
                         f"{_fmt(_number(cv.get('psnr_db_sd')), 2)} dB")
            add(f"Held-out reconstructions in cross-validation "
                f"({cv.get('held_out_scans', '?')} scans)", text)
    for note in provenance.get("Notes") or []:
        add("Note", str(note))
    lines.append("</table>")
    if present:
        def render() -> tuple[Path, None]:
            data = {suffix: _slice_data(_fig.load_3d(path)) for suffix, path in paths.items()}
            fig = _fig.plot_slice_row(
                [("input slice", data["inputslice"]), ("reconstruction", data["reconslice"]),
                 ("|reconstruction - input|", data["reconerrorslice"])], diff_index=2)
            return _fig.save_figure(fig, _fig_path(output_dir, source, space=TEMPLATE_SPACE,
                                                   desc=_DIFFUSION_AE_DESC,
                                                   suffix="reconslice")), None
        caption = ("The network input of diffusion-ae (the medial axial slice of the T1w in "
                   "template space, normalised to [0, 1]), its DDIM reconstruction by the "
                   "diffusion autoencoder (encoded to its semantic latent and stochastic code, "
                   "then decoded) and their absolute difference (colour bar). Anterior is up, "
                   "the participant's left on the left. A reconstruction that misses anatomy "
                   "(low SSIM, bright difference) marks a scan unlike the training scans: its "
                   "brain age deserves less trust.")
        lines.append(_html_figure(output_dir, _render(
            "diffusion-ae: input slice, reconstruction and difference", caption, render)))
    return "\n".join(lines)


def _html_figure(output_dir: Path, figure: _Figure) -> str:
    head = f"<h3>{_e(figure.title)}</h3>"
    if figure.path is None:
        return (f"{head}<p class=\"missing\">This figure could not be drawn: "
                f"{_e(figure.error)}</p>")
    src = _e(Path(os.path.relpath(figure.path, output_dir)).as_posix())
    img = f"<img src=\"{src}\" alt=\"{_e(figure.title)}\">"
    if figure.alt_path is not None:
        alt = _e(Path(os.path.relpath(figure.alt_path, output_dir)).as_posix())
        img = (f"<div class=\"flicker\">{img}<img class=\"alt\" src=\"{alt}\" "
               f"alt=\"{_e(figure.title)} (template)\"></div>")
    return f"{head}<figure>{img}<figcaption>{_e(figure.caption)}</figcaption></figure>"


def _html_unit(output_dir: Path, files: _UnitFiles, row: Mapping[str, Any]) -> str:
    status, css = _status(row)
    parts = [f"<section id=\"{_e(files.source.prefix)}\">",
             f"<h2>{_e(files.source.prefix)}<span class=\"badge {css}\">{status}</span></h2>"]
    if files.missing:
        items = "".join(f"<li>{_e(m)}</li>" for m in files.missing)
        parts.append("<div class=\"missing\"><p>Processing of this T1w did not complete: "
                     f"these derivatives are missing.</p><ul>{items}</ul>"
                     "<p>See the Errors section below.</p></div>")
    parts.append(_html_summary_table(row))
    parts.append(_html_brainage(files.get("brainage")))
    parts.append(_html_diffusion_ae(output_dir, files))
    for figure in _unit_figures(output_dir, files, _similarity_text(row)):
        parts.append(_html_figure(output_dir, figure))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _html_overview(label: str, rows: Sequence[Mapping[str, Any]], errors: Sequence[str],
                   run_uuid: str, date: str) -> str:
    n_ok = sum(r["complete"] for r in rows)
    meta = [("Participant", f"sub-{label}"), ("T1w images", str(len(rows))),
            ("Completed", f"{n_ok} of {len(rows)}"), ("Errors", str(len(errors))),
            ("Template space", TEMPLATE_SPACE), ("brainage version", __version__),
            ("Run", run_uuid), ("Date", date)]
    lines = ["<table class=\"meta\">"]
    lines += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meta]
    lines.append("</table>")
    if not rows:
        lines.append("<p class=\"missing\">No derivatives were found for this participant.</p>")
        return "\n".join(lines)
    lines.append("<table><tr><th>T1w</th><th>Status</th><th>Mask (mL)</th><th>GM (mL)</th>"
                 "<th>WM (mL)</th><th>CSF (mL)</th><th>Registration similarity</th>"
                 "<th>Warnings</th></tr>")
    for row in rows:
        status, css = _status(row)
        sim = _fmt(row["registration_similarity"], 4)
        lines.append(
            f"<tr><td><a href=\"#{_e(row['unit'])}\">{_e(row['unit'])}</a></td>"
            f"<td><span class=\"badge {css}\">{status}</span></td>"
            + "".join(f"<td class=\"num\">{_fmt(row[k])}</td>"
                      for k in ("mask_volume_ml", "gm_volume_ml", "wm_volume_ml", "csf_volume_ml"))
            + f"<td class=\"num\">{sim}</td><td class=\"num\">{len(row['warnings'])}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _html_errors(errors: Sequence[str]) -> str:
    if not errors:
        return "<p>No errors to report.</p>"
    return "\n".join(f"<pre class=\"error\">{_e(text)}</pre>" for text in errors)


def _html_methods(methods: str, versions: Mapping[str, str]) -> str:
    text = methods.strip()
    if not text:
        text = (f"Results in this report were generated with brainage {__version__}, using "
                f"ANTs (antspyx {versions.get('ANTs (antspyx)', 'n/a')}), nipype "
                f"{versions.get('nipype', 'n/a')}, nibabel {versions.get('nibabel', 'n/a')}, "
                f"nilearn {versions.get('nilearn', 'n/a')}, PyTorch "
                f"{versions.get('PyTorch', 'n/a')} and deepbet {versions.get('deepbet', 'n/a')}. "
                "Spatial normalisation targeted the ICBM 2009a Nonlinear Symmetric template "
                f"({TEMPLATE_SPACE}; Fonov et al., 2009, 2011) as distributed with nilearn.")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n".join(f"<p>{_e(p)}</p>" for p in paragraphs)


def _html_versions(versions: Mapping[str, str]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in versions.items())
    return f"<table class=\"meta\">{rows}</table>"


def _html_nav(label: str, units: Sequence[SourceEntities]) -> str:
    links = [("#summary", "Summary")]
    links += [(f"#{u.prefix}", u.prefix.replace(f"sub-{label}_", "") or u.prefix) for u in units]
    links += [("#errors", "Errors"), ("#methods", "Methods")]
    return "".join(f"<a href=\"{_e(href)}\">{_e(text)}</a>" for href, text in links)


def _check_units(units: Sequence[SourceEntities | str | os.PathLike] | None, label: str
                 ) -> list[SourceEntities]:
    if units is None:
        return []
    if isinstance(units, (str, os.PathLike)):
        raise TypeError("units must be a sequence of SourceEntities or paths, not one path")
    checked = []
    for unit in units:
        source = unit if isinstance(unit, SourceEntities) else SourceEntities.from_path(unit)
        if source.subject != label:
            raise ValueError(f"units: {source.prefix} does not belong to sub-{label}")
        checked.append(source)
    return checked


def generate_participant_report(output_dir: str | os.PathLike, subject: str, *, run_uuid: str,
                                methods: str = "", errors: Sequence[str] = (),
                                extra_versions: Mapping[str, str] | None = None,
                                units: Sequence[SourceEntities | str | os.PathLike] | None = None
                                ) -> Path:
    """Write ``sub-<label>.html`` and its figures for one participant.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset (the report reads derivatives only from here).
    subject : str
        Participant label, with or without ``sub-``.
    run_uuid : str
        Identifier of this run, printed in the report.
    methods : str
        Methods text (paragraphs separated by blank lines); a short default names the
        software and template when empty.
    errors : sequence of str
        Crash messages of this participant's failed units, shown in the Errors section.
    extra_versions : mapping or None
        Extra ``{name: version}`` rows for the versions table (see :func:`software_versions`).
    units : sequence of SourceEntities or paths, optional
        T1w images that were meant to be processed; a unit that left no derivative at all
        (it failed early) still gets a section saying so.  Units found in ``output_dir`` are
        always included.

    Returns
    -------
    pathlib.Path
        ``output_dir/sub-<label>.html``.

    Raises
    ------
    InputMissingError
        ``output_dir`` does not exist.
    NotWritableError
        The report or its figures cannot be written.
    """
    label = _check_subject(subject)
    output_dir = _check_output_dir(output_dir)
    if not isinstance(run_uuid, str) or not run_uuid.strip():
        raise ValueError("run_uuid must be a non-empty str")
    if not isinstance(methods, str):
        raise TypeError(f"methods must be a str, got {type(methods).__name__}")
    if isinstance(errors, (str, bytes)) or not isinstance(errors, Sequence):
        raise TypeError("errors must be a sequence of str (not a single str)")
    errors = [str(e) for e in errors]
    versions = software_versions(extra_versions)

    found = {u.prefix: u for u in find_units(output_dir, label)}
    for unit in _check_units(units, label):
        found.setdefault(unit.prefix, unit)
    all_units = sorted(found.values(), key=_unit_sort_key)
    LOGGER.info("writing report of sub-%s (%d T1w)", label, len(all_units))

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        rows, sections = [], []
        for unit in all_units:
            files = _unit_files(output_dir, unit)
            row = unit_summary(output_dir, unit)
            rows.append(row)
            sections.append(_html_unit(output_dir, files, row))
        template = (importlib.resources.files("bidsapp.reports") / "templates"
                    / "participant.html").read_text(encoding="utf-8")
        page = Template(template).substitute(
            title=_e(f"brainage report: sub-{label}"), version=_e(__version__),
            nav=_html_nav(label, all_units),
            summary=_html_overview(label, rows, errors, run_uuid, date),
            units="\n".join(sections), errors=_html_errors(errors),
            methods=_html_methods(methods, versions), versions=_html_versions(versions),
            date=_e(date), run_uuid=_e(run_uuid))
        target = output_dir / f"sub-{label}.html"
        with atomic_write(target, "w") as handle:
            handle.write(page)
    except PermissionError as exc:
        raise NotWritableError(f"cannot write the report of sub-{label}: {exc}") from exc
    LOGGER.info("wrote %s", target)
    return target
