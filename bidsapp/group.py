"""The group level: statistics over what the participant jobs left in ``output_dir``.

``run_group_level`` reads every ``*_brainage.tsv`` table, the Jacobian-modulated GM maps
(VBM input), brain-age and relevance maps in MNI152NLin2009aSym 2 mm, joins them with the
phenotypes of ``participants.tsv`` / ``sessions.tsv``, and writes at the root of
``output_dir``: ``group_brainage.tsv``, ``group_stats.tsv`` (+ JSON dictionaries),
``group_roivolumes.tsv``, statistic maps ``space-…_res-2_desc-<set>_contrast-<A>Vs<B>_stat-
{t,d,tfce,p,pfwe}_statmap.nii.gz``, ``desc-<model>_biasfit.json`` and ``group.html``.
Every file is written atomically. The statistics come from :mod:`bidsapp.stats`.

Relevance maps of the models whose papers asked for permutation analyses of them (``mlens``,
seed 002, and ``densenet-clinical``) get the group contrasts and the analyses of seed 002 (one
scan per participant), as statistic maps named like the contrasts: ``desc-<model>absrelevance_contrast-MeanVsZero`` (one-sample
sign-flip test of |relevance|), ``desc-<model>relevanceagegroup_contrast-{OldVsYoung,
YoungVsOld}`` (age >= 60 vs <= 40) and ``desc-<model>relevancepad_contrast-{PADVsZero,
ZeroVsPAD}`` (brain-PAD slope with age and age^2 as covariates, Freedman–Lane; effect size
``stat-r``, the partial correlation).  The Grad-CAM maps of ``vgg-cbv`` (seed 003) get no
permutation test: as in the paper (Fig. 4) they are averaged per 10-year age group, one scan
per participant, into ``space-…_res-2_desc-vggcbvage<lo>to<hi>_relevancemap.nii.gz`` and drawn
over the mean T1w of the same scans in the report.

Between-group analyses use one scan per participant (the first by session, acquisition,
run); repeated scans of a participant feed the ICC analyses.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from . import stats
from .derivatives import TEMPLATE_SPACE, SourceEntities, atomic_write, write_json
from .errors import ImageError, InputMissingError, PhenotypeError, UsageError
from .jsonfiles import read_json_file

__all__ = ["GroupOptions", "GroupResult", "run_group_level"]

LOGGER = logging.getLogger("brainage.group")

_GM_SUFFIX = f"_space-{TEMPLATE_SPACE}_res-2_label-GM_desc-modulated_probseg.nii.gz"
_MASK_SUFFIX = f"_space-{TEMPLATE_SPACE}_res-2_desc-brain_mask.nii.gz"
_STD_T1W_SUFFIX = f"_space-{TEMPLATE_SPACE}_res-2_desc-preproc_T1w.nii.gz"
_MAP_RE = re.compile(rf"_space-{TEMPLATE_SPACE}_res-2_desc-(?P<model>[A-Za-z0-9]+)_"
                     r"(?P<kind>brainagemap|relevancemap)\.nii(?:\.gz)?$")
_MISSING = {"", "n/a", "na", "nan", "none"}
_VBM = "GMvolume"            # desc label of the VBM (modulated GM) analyses
_GM_MASK_THRESHOLD = 0.1     # mean modulated GM below this is not analysed (VBM practice)
# seed 002: age groups of the young-vs-old relevance contrast (years)
_YOUNG_MAX_AGE, _OLD_MIN_AGE = 40.0, 60.0
_MIN_PAD_SCANS = 6           # relevance ~ PAD + age + age^2: 4 parameters, >= 2 residual df
# desc labels of the models whose relevance maps get permutation analyses (their papers ran them:
# seed 002 mlens; densenet-clinical); other models' maps are not tested voxelwise
_PERMUTATION_RELEVANCE = ("mlens", "densenetclinical")
# desc labels of Grad-CAM maps averaged per age group (seed 003 vgg-cbv, Fig. 4) and its width
_GRADCAM_AGE_GROUPS = {"vggcbv": "vgg-cbv"}
_GRADCAM_GROUP_YEARS = 10
_STATS_COLUMNS = ["model", "level", "region", "contrast", "test", "statistic", "df", "p",
                  "p_corrected", "effect_size"]


@dataclass(frozen=True)
class GroupOptions:
    """Options of the group level (the same keys as the ``--analysis`` JSON file).

    Attributes
    ----------
    group_column : str
        Phenotype column holding the group labels.
    control_label : str
        Label of the control group (bias fits use controls only).
    covariates : tuple of str
        Phenotype columns used as GLM covariates and correlated with brain-PAD.
    contrasts : tuple of str
        ``'A-B'`` group contrasts; empty: every pair of groups, oriented group vs controls.
    bias_correction : {'linear-age', 'linear-predicted', 'extremes', 'agebin', 'none'}
    bias_fit_on : str
        ``'controls'`` or the path of a ``desc-<model>_biasfit.json`` from another run.
    n_perm : int
        Relabellings for permutation inference (the unpermuted one included).
    tfce : bool
        TFCE inference (else voxelwise max-t only).
    tfce_steps : {'fixed', 'per-map'}
        randomise's fixed step (max/100 of the unpermuted map) or nilearn's per-map rule.
    connectivity : {6, 18, 26}
    alpha : float
        Significance level for reports and summaries.
    sliding_window_step : float
        Step (years) of the 10-year sliding age windows.
    """

    group_column: str = "group"
    control_label: str = "HC"
    covariates: tuple = ()
    contrasts: tuple = ()
    bias_correction: str = "linear-age"
    bias_fit_on: str = "controls"
    n_perm: int = 5000
    tfce: bool = True
    tfce_steps: str = "fixed"
    connectivity: int = 6
    alpha: float = 0.05
    sliding_window_step: float = 5.0

    def __post_init__(self):
        for name in ("group_column", "control_label", "bias_fit_on"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UsageError(f"group option '{name}' must be a non-empty string; got {getattr(self, name)!r}")
        for name in ("covariates", "contrasts"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise UsageError(f"group option '{name}' must be a list of strings; got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.bias_correction not in stats.BIAS_METHODS:
            raise UsageError(f"group option 'bias_correction' must be one of {list(stats.BIAS_METHODS)}; "
                             f"got {self.bias_correction!r}")
        if isinstance(self.n_perm, bool) or not isinstance(self.n_perm, int) or self.n_perm < 1:
            raise UsageError(f"group option 'n_perm' must be an integer >= 1; got {self.n_perm!r}")
        if not isinstance(self.tfce, bool):
            raise UsageError(f"group option 'tfce' must be true or false; got {self.tfce!r}")
        if self.tfce_steps not in ("fixed", "per-map"):
            raise UsageError(f"group option 'tfce_steps' must be 'fixed' or 'per-map'; got {self.tfce_steps!r}")
        if self.connectivity not in (6, 18, 26) or isinstance(self.connectivity, bool):
            raise UsageError(f"group option 'connectivity' must be 6, 18 or 26; got {self.connectivity!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise UsageError(f"group option 'alpha' must be in (0, 1); got {self.alpha!r}")
        step = self.sliding_window_step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise UsageError(f"group option 'sliding_window_step' must be > 0; got {step!r}")
        if self.control_label in ("", None):
            raise UsageError("group option 'control_label' must not be empty")

    @classmethod
    def from_json(cls, path):
        """Options from a JSON analysis file (unknown keys raise ``UsageError``).

        Parameters
        ----------
        path : str or pathlib.Path
            JSON object whose keys are field names (``-`` may replace ``_``).

        Returns
        -------
        GroupOptions
        """
        path = Path(path)
        spec = read_json_file(path, "analysis file")
        if not isinstance(spec, dict):
            raise UsageError(f"analysis file {path} must hold a JSON object")
        spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise UsageError(f"analysis file {path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        for key in ("covariates", "contrasts"):
            if isinstance(spec.get(key), list):
                spec[key] = tuple(spec[key])
        return cls(**spec)

    def to_dict(self):
        """The options as a JSON-serialisable dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class GroupResult:
    """What :func:`run_group_level` wrote.

    Attributes
    ----------
    files : tuple of pathlib.Path
        Every file written, in writing order.
    summary : dict
        Counts (scans, participants, groups), models, contrasts and, per analysis and
        contrast, the number of voxels significant after FWE correction.
    """

    files: tuple
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def _collect_outputs(output_dir):
    """One row per T1w that left outputs: entities and the paths found."""
    rows = {}
    files = sorted(output_dir.glob("sub-*/anat/*")) + sorted(output_dir.glob("sub-*/ses-*/anat/*"))
    for path in files:
        name = path.name
        kind = None
        if name.endswith("_brainage.tsv"):
            kind = "brainage_tsv"
        elif name.endswith(_GM_SUFFIX):
            kind = "gm"
        elif name.endswith(_MASK_SUFFIX):
            kind = "mask"
        elif name.endswith(_STD_T1W_SUFFIX):
            kind = "std_t1w"
        elif _MAP_RE.search(name):
            kind = "map"
        if kind is None:
            continue
        try:
            src = SourceEntities.from_path(name)
        except ValueError:
            continue
        row = rows.setdefault(src.prefix, {
            "scan": src.prefix, "participant_id": f"sub-{src.subject}",
            "session_id": f"ses-{src.session}" if src.session else None,
            "subject": src.subject, "session": src.session, "acq": src.acquisition, "run": src.run,
            "brainage_tsv": None, "gm": None, "mask": None, "std_t1w": None, "brainagemap": {},
            "relevancemap": {}})
        if kind == "map":
            match = _MAP_RE.search(name)
            row[match["kind"]][match["model"]] = path
        else:
            row[kind] = path
    if not rows:
        raise InputMissingError(
            f"no participant outputs (*_brainage.tsv, modulated GM or brain-age maps) under {output_dir}; "
            "run the participant level first")
    table = pd.DataFrame(list(rows.values()))
    order = ["subject", "session", "acq", "run"]
    table = table.sort_values(order, key=lambda s: s.fillna("")).reset_index(drop=True)
    # the first scan of each participant represents it in between-group analyses
    table["primary"] = ~table.duplicated("participant_id")
    return table


def _read_table(path):
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    return table.apply(lambda col: col.str.strip()).replace({v: np.nan for v in _MISSING})


def _units(tsv, column):
    sidecar = tsv.with_suffix(".json")
    if sidecar.is_file():
        try:
            entry = json.loads(sidecar.read_text(encoding="utf-8")).get(column)
        except ValueError:
            return None
        if isinstance(entry, dict) and entry.get("Units"):
            return str(entry["Units"])
    return None


def _phenotypes(bids_dir, scans):
    """Phenotype table (one row per scan) from participants.tsv and sessions.tsv."""
    from .bids.ages import to_years

    pheno = pd.DataFrame({"scan": scans["scan"]})
    cols = {}
    age = pd.Series(np.nan, index=scans.index)
    part = bids_dir / "participants.tsv"
    if part.is_file():
        ptab = _read_table(part)
        if "participant_id" not in ptab:
            raise PhenotypeError(f"{part} has no 'participant_id' column")
        ptab = ptab.drop_duplicates("participant_id").set_index("participant_id")
        for c in ptab.columns:
            cols[c] = scans["participant_id"].map(ptab[c])
        if "age" in ptab:
            unit = _units(part, "age")
            age = cols["age"].map(lambda v: to_years(v, unit, where=f"{part} (column 'age')")[0])
    for sub, idx in scans.groupby("subject").groups.items():
        tsv = bids_dir / f"sub-{sub}" / f"sub-{sub}_sessions.tsv"
        if not tsv.is_file():
            continue
        stab = _read_table(tsv)
        if "session_id" not in stab:
            continue
        stab = stab.drop_duplicates("session_id").set_index("session_id")
        sess = scans.loc[idx, "session_id"]
        for c in stab.columns:
            if c in ("subject", "participant_id"):
                continue
            values = sess.map(stab[c])  # session values override participant values
            base = cols.setdefault(c, pd.Series(np.nan, index=scans.index, dtype=object)).astype(object)
            base.loc[idx] = values.where(values.notna(), base.loc[idx])
            cols[c] = base
        if "age" in stab:
            unit = _units(tsv, "age")
            ses_age = sess.map(stab["age"]).map(
                lambda v: to_years(v, unit, where=f"{tsv} (column 'age')")[0])
            age.loc[idx] = ses_age.where(ses_age.notna(), age.loc[idx])
    for c, values in cols.items():
        pheno[c] = values.values
    pheno["age_years"] = pd.to_numeric(age, errors="coerce").values
    return pheno


def _read_brainage(scans):
    """Long table (scan x model) of every ``*_brainage.tsv`` row."""
    frames = []
    for scan, path in zip(scans["scan"], scans["brainage_tsv"]):
        if path is None:
            continue
        tab = _read_table(path)
        if tab.empty:
            continue
        missing = {"model", "brain_age"} - set(tab.columns)
        if missing:
            raise PhenotypeError(f"{path}: missing column(s) {sorted(missing)}")
        tab = tab.assign(scan=scan)
        for c in ("brain_age", "age", "brain_pad"):
            tab[c] = pd.to_numeric(tab.get(c, np.nan), errors="coerce")
        frames.append(tab[["scan", "model", "brain_age", "age", "brain_pad"]])
    if not frames:
        return pd.DataFrame(columns=["scan", "model", "brain_age", "age", "brain_pad"])
    return pd.concat(frames, ignore_index=True)


def _split_contrast(text, labels):
    """``'A-B'`` -> (A, B), where A and B are existing labels (labels may contain '-')."""
    for i, ch in enumerate(text):
        if ch == "-" and text[:i] in labels and text[i + 1:] in labels and text[:i] != text[i + 1:]:
            return text[:i], text[i + 1:]
    raise PhenotypeError(f"contrast {text!r} is not 'A-B' with two different group labels; "
                         f"labels present: {sorted(labels)}")


def _resolve_design(scans, pheno, options):
    """Check columns/labels and return (groups series, contrasts list, covariate frame)."""
    available = sorted(c for c in pheno.columns if c not in ("scan", "age_years"))
    if options.group_column not in pheno:
        raise PhenotypeError(f"group column {options.group_column!r} not found in participants.tsv/"
                             f"sessions.tsv; columns present: {available}")
    missing = [c for c in options.covariates if c not in pheno and c != "age"]
    if missing:
        raise PhenotypeError(f"covariate column(s) {missing} not found; columns present: {available}")
    groups = pheno[options.group_column]
    labels = sorted(groups.dropna().unique().tolist())
    if options.control_label not in labels:
        raise PhenotypeError(f"control label {options.control_label!r} not in column "
                             f"{options.group_column!r}; labels present: {labels}")
    if options.contrasts:
        contrasts = [_split_contrast(c, set(labels)) for c in options.contrasts]
    else:
        others = [g for g in labels if g != options.control_label]
        contrasts = [(g, options.control_label) for g in others] + list(combinations(others, 2))
    covs = pd.DataFrame(index=pheno.index)
    for c in options.covariates:
        covs[c] = pheno["age_years"] if c == "age" else pheno[c]
    return groups, contrasts, covs


def _covariate_matrix(covs):
    """Numeric design columns (demeaned); categorical covariates become dummies."""
    parts = []
    for c in covs.columns:
        num = pd.to_numeric(covs[c], errors="coerce")
        if num.notna().sum() == covs[c].notna().sum():
            parts.append(num.to_frame(c))
        else:
            parts.append(pd.get_dummies(covs[c], prefix=c, drop_first=True, dtype=float)
                         .where(covs[c].notna()))
    if not parts:
        return pd.DataFrame(index=covs.index)
    mat = pd.concat(parts, axis=1).astype(float)
    return mat - mat.mean()


# --------------------------------------------------------------------------- writing


class _Writer:
    """Atomic writers that remember every file written."""

    def __init__(self, output_dir):
        self.root = output_dir
        self.files = []

    def json(self, name, content):
        self.files.append(write_json(self.root / name, content))
        return self.files[-1]

    def tsv(self, name, table, dictionary=None):
        path = self.root / name
        text = table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.10g", lineterminator="\n")
        with atomic_write(path, "w") as handle:
            handle.write(text)
        self.files.append(path)
        if dictionary is not None:
            self.json(name.replace(".tsv", ".json"), dictionary)
        return path

    def nifti(self, name, data, affine, sidecar=None):
        path = self.root / name
        img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
        img.header.set_xyzt_units("mm")
        with atomic_write(path, "wb") as handle:
            handle.write(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
        self.files.append(path)
        if sidecar is not None:
            self.json(name.replace(".nii.gz", ".json"), sidecar)
        return path


def _label(text):
    """Alphanumeric BIDS label from a group/model name."""
    clean = re.sub(r"[^A-Za-z0-9]", "", str(text))
    return clean or "x"


def _statmap_name(desc, a, b, stat):
    return (f"space-{TEMPLATE_SPACE}_res-2_desc-{_label(desc)}_contrast-{_label(a)}Vs{_label(b)}"
            f"_stat-{stat}_statmap.nii.gz")


def _row(model, level, region, contrast, test, statistic, df=np.nan, p=np.nan, p_corrected=np.nan,
         effect_size=np.nan):
    return dict(zip(_STATS_COLUMNS, (model, level, region, contrast, test, statistic, df, p,
                                     p_corrected, effect_size)))


# --------------------------------------------------------------------------- analyses


@dataclass
class _Context:
    """State shared by the analyses of one run."""

    output_dir: Path
    options: GroupOptions
    scans: pd.DataFrame
    pheno: pd.DataFrame
    groups: pd.Series
    contrasts: list
    covs: pd.DataFrame
    writer: _Writer
    rng: np.random.Generator
    nprocs: int
    rows: list = field(default_factory=list)
    report: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    atlas: tuple | None = None

    def report_data(self, per_model, stats_table):
        """Everything :func:`bidsapp.reports.group.write_group_report` needs."""
        return {"options": self.options.to_dict(), "summary": self.summary, "stats": stats_table,
                "contrasts": self.contrasts, "output_dir": self.output_dir, "per_model": per_model,
                **self.report}


def _maps_on_one_grid(paths, what, dtype):
    """The grid of the first 3D map and an iterator over all maps as ``dtype`` arrays, read one at
    a time; the iterator raises :class:`ImageError` at the first map on another grid.

    Returns
    -------
    (shape, affine, iterator of ndarray)
    """
    first = nib.load(paths[0])
    shape, affine = first.shape[:3], first.affine

    def arrays():
        for p in paths:
            img = nib.load(p)
            if img.shape[:3] != shape or not np.allclose(img.affine, affine, atol=1e-3):
                raise ImageError(f"{p}: {what} maps are not all on one grid "
                                 f"({img.shape[:3]} vs {shape}); rerun the participant level")
            yield np.asarray(img.dataobj, dtype=dtype).reshape(shape)

    return shape, affine, arrays()


def _load_maps(paths, what):
    """Stack 3D images (all on one grid) into float32 (n, X, Y, Z); returns (data, affine)."""
    shape, affine, arrays = _maps_on_one_grid(paths, what, np.float32)
    out = np.empty((len(paths),) + shape, dtype=np.float32)
    for i, data in enumerate(arrays):
        out[i] = data
    return out, affine


def _analysis_mask(ctx, data, rows):
    """Voxels analysed: inside every participant brain mask present, finite everywhere."""
    mask = np.all(np.isfinite(data), axis=0)
    masks = [p for p in ctx.scans.loc[rows, "mask"] if p is not None]
    for p in masks:
        m = np.asarray(nib.load(p).dataobj) > 0
        if m.shape == mask.shape:
            mask &= m
    return mask


def _atlas(ctx, affine, shape):
    from .atlases import load_harvard_oxford

    key = (shape, affine.tobytes())
    if ctx.atlas is None or ctx.atlas[0] != key:
        img, table = load_harvard_oxford(nib.Nifti1Image(np.zeros(shape, np.int8), affine))
        ctx.atlas = (key, np.asarray(img.dataobj), table)
    return ctx.atlas[1], ctx.atlas[2]


def _contrast_rows(ctx, rows, a, b):
    """Scans (primary, in groups a/b, complete covariates) and the GLM design."""
    sel = rows[ctx.scans.loc[rows, "primary"].to_numpy() & ctx.groups.loc[rows].isin([a, b]).to_numpy()]
    cov = _covariate_matrix(ctx.covs.loc[sel]) if len(ctx.covs.columns) else pd.DataFrame(index=sel)
    complete = cov.notna().all(axis=1).to_numpy()
    if not complete.all():
        LOGGER.warning("contrast %s-%s: %d scan(s) without covariates left out", a, b, (~complete).sum())
    sel = sel[complete]
    cov = cov.loc[sel]
    is_a = (ctx.groups.loc[sel] == a).to_numpy(float)
    design = np.column_stack([is_a, 1.0 - is_a, (cov - cov.mean()).to_numpy()]) if len(cov.columns) \
        else np.column_stack([is_a, 1.0 - is_a])
    return sel, is_a.astype(bool), design


def _permutation_test(options, data, design, contrasts, mask, random_state, n_jobs):
    """:func:`bidsapp.stats.permutation_test` with the group options (permutations, TFCE)."""
    return stats.permutation_test(
        data, design, contrasts, mask=mask, n_perm=options.n_perm, tfce=options.tfce,
        tfce_steps=options.tfce_steps, connectivity=options.connectivity, random_state=random_state,
        n_jobs=n_jobs, progress=LOGGER.isEnabledFor(logging.INFO))


def _permute(ctx, data, design, contrasts, mask):
    """:func:`_permutation_test` with the run's options, generator and workers."""
    return _permutation_test(ctx.options, data, design, contrasts, mask, ctx.rng, ctx.nprocs)


def _inference_meta(ctx, res):
    """Sidecar fields shared by every permutation statistic map."""
    opts = ctx.options
    return {"NPermutations": res.n_perm, "Exhaustive": res.exhaustive, "Scheme": res.scheme,
            "Inference": (f"TFCE (H=2, E=0.5, connectivity {opts.connectivity}, "
                          f"steps {opts.tfce_steps})" if opts.tfce else "voxelwise max-t")}


def _write_direction(ctx, res, k, *, desc, label, g1, g2, mask, affine, meta, t_map, effect,
                     test, report_key="voxel_maps", region_label=None):
    """Write the maps of contrast row ``k`` of ``res`` and its summary row.

    Parameters
    ----------
    ctx : _Context
    res : bidsapp.stats.PermutationResult
    k : int
        Contrast row of ``res`` (one tested direction, ``g1 > g2``).
    desc, label : str
        ``desc`` entity of the map names; analysis name in group_stats.tsv and the summary.
    g1, g2 : str
        Direction, written as ``contrast-<g1>Vs<g2>`` and ``'g1-g2'``.
    mask : numpy.ndarray of bool
    affine : numpy.ndarray
    meta : dict
        Sidecar fields of every map of this direction.
    t_map : tuple of (numpy.ndarray, str)
        The ``stat-t`` values and their description.
    effect : tuple of (str, numpy.ndarray, str)
        Effect-size map: ``stat`` entity, values, description; its value at the peak goes
        to ``effect_size``.
    test : str
        Test-name prefix; ``_tfce_fwe`` or ``_maxt_fwe`` is appended.
    report_key : str, default='voxel_maps'
        Report section the maps are listed in.
    region_label : str, optional
        Contrast wording in the summary and report (default ``'g1 > g2'``).
    """
    opts = ctx.options
    infer = res.tfce_p_fwe[k] if opts.tfce else res.p_fwe[k]
    unc = res.tfce_p_uncorrected[k] if opts.tfce else res.p_uncorrected[k]
    e_stat, e_values, e_name = effect
    maps = {"t": t_map, e_stat: (e_values, e_name),
            "p": (unc, "uncorrected one-sided permutation p"),
            "pfwe": (infer, "FWE-corrected one-sided permutation p (max statistic)")}
    if opts.tfce:
        maps["tfce"] = (res.tfce[k], "TFCE of the GLM t map")
    for stat, (values, name) in maps.items():
        vol = np.zeros(mask.shape)
        vol[mask] = np.nan_to_num(values)
        ctx.writer.nifti(_statmap_name(desc, g1, g2, stat), vol, affine,
                         {**meta, **_inference_meta(ctx, res), "Statistic": name})
    stat_map = res.tfce[k] if opts.tfce else res.t[k]
    peak = int(np.argmax(stat_map))
    xyz = nib.affines.apply_affine(affine, np.argwhere(mask)[peak])
    n_sig = int(np.sum(infer <= opts.alpha))
    ctx.rows.append(_row(label, "voxel", "peak at (%.0f, %.0f, %.0f) mm" % tuple(xyz), f"{g1}-{g2}",
                         f"{test}_{'tfce' if opts.tfce else 'maxt'}_fwe", float(stat_map[peak]), res.dof,
                         float(infer[peak]), float(infer.min()), float(e_values[peak])))
    wording = region_label or f"{g1} > {g2}"
    key = f"{label}:{g1}>{g2}" if region_label is None else f"{label}:{region_label.replace(' ', '')}"
    ctx.summary.setdefault("significant_voxels", {})[key] = n_sig
    ctx.report.setdefault(report_key, []).append(
        {"analysis": desc, "contrast": wording, "n_significant": n_sig,
         "effect": ctx.output_dir / _statmap_name(desc, g1, g2, e_stat), "effect_label": e_name,
         "effect_stat": e_stat, "pfwe": ctx.output_dir / _statmap_name(desc, g1, g2, "pfwe"),
         "n_voxels": int(mask.sum()), "tag": f"desc-{_label(desc)}_contrast-{_label(g1)}Vs{_label(g2)}"})


def _voxel_contrasts(ctx, desc, label, vec, mask, affine, rows, what):
    """Welch t, d and permutation inference (both directions) for every contrast.

    ``vec`` holds the masked maps, one row per scan of ``rows``.
    """
    opts = ctx.options
    for a, b in ctx.contrasts:
        sel, is_a, design = _contrast_rows(ctx, rows, a, b)
        pos = np.searchsorted(rows, sel)
        ya, yb = vec[pos[is_a]], vec[pos[~is_a]]
        if ya.shape[0] < 2 or yb.shape[0] < 2:
            LOGGER.warning("%s, contrast %s-%s: fewer than 2 scans in a group, skipped", label, a, b)
            continue
        welch = stats.welch_ttest(ya, yb)
        d = welch.effect_size
        contrast = np.zeros(design.shape[1])
        contrast[:2] = (1.0, -1.0)
        LOGGER.info("%s, %s vs %s: %d permutations%s", label, a, b, opts.n_perm, " + TFCE" if opts.tfce else "")
        res = _permute(ctx, vec[pos], design, np.stack([contrast, -contrast]), mask)
        t_map = welch.statistic if design.shape[1] == 2 else res.t[0]
        t_name = "Welch t (seed 000 eq. 1)" if design.shape[1] == 2 else "GLM t adjusted for covariates"
        for k, (g1, g2) in enumerate(((a, b), (b, a))):
            sign = 1.0 if k == 0 else -1.0
            meta = {"Description": f"{what}: {g1} > {g2}", "Contrast": f"{g1} > {g2}",
                    "NGroup1": int((is_a if k == 0 else ~is_a).sum()),
                    "NGroup2": int((~is_a if k == 0 else is_a).sum()),
                    "Covariates": list(opts.covariates)}
            _write_direction(ctx, res, k, desc=desc, label=label, g1=g1, g2=g2, mask=mask, affine=affine,
                             meta=meta, t_map=(sign * t_map, t_name),
                             effect=("d", sign * d, "Cohen's d, pooled SD (seed 000 eq. 3)"),
                             test="permutation")


def _roi_contrasts(ctx, label, values, names, rows, what):
    """Welch t / Cohen's d per ROI (seed 000 Table 5), Bonferroni over ROIs."""
    for a, b in ctx.contrasts:
        sel, is_a, _ = _contrast_rows(ctx, rows, a, b)
        pos = np.searchsorted(rows, sel)
        ya, yb = values[pos[is_a]], values[pos[~is_a]]
        if ya.shape[0] < 2 or yb.shape[0] < 2:
            continue
        ok = np.all(np.isfinite(ya), axis=0) & np.all(np.isfinite(yb), axis=0)
        ok &= (np.ptp(np.vstack([ya, yb]), axis=0) > 0) if ok.any() else ok
        if not ok.any():
            continue
        res = stats.welch_ttest(ya[:, ok], yb[:, ok])
        pc = stats.bonferroni(res.pvalue)
        table = []
        for j, name in enumerate(np.asarray(names)[ok]):
            ctx.rows.append(_row(label, "roi", name, f"{a}-{b}", f"welch_t_{what}", res.statistic[j],
                                 res.df[j], res.pvalue[j], pc[j], res.effect_size[j]))
            table.append((name, res.statistic[j], res.pvalue[j], pc[j], res.effect_size[j]))
        ctx.report.setdefault("roi_tables", []).append(
            {"analysis": label, "what": what, "contrast": f"{a} vs {b}", "rows": table})


def _icc_analysis(ctx, label, vec, mask, affine, rows, roi_values=None, roi_names=None,
                  global_values=None):
    """ICC(2,1) over repeated scans: voxel map (``vec``: masked maps), ROI and global values."""
    scans = ctx.scans.loc[rows]
    counts = scans.groupby("participant_id")["scan"].transform("count").to_numpy()
    rep = rows[counts >= 2]
    if len(np.unique(ctx.scans.loc[rep, "participant_id"])) < 3:
        return
    # first two scans of each participant with repeats: (n, 2, ...) ratings
    first = ctx.scans.loc[rep].groupby("participant_id").head(2)
    pids = first["participant_id"].unique()
    idx = np.array([[np.searchsorted(rows, i) for i in first.index[first["participant_id"] == p]]
                    for p in pids])
    if vec is not None:
        ratings = np.asarray(vec, dtype=np.float64)[idx]
        icc = stats.icc(ratings, "2,1")
        vol = np.zeros(mask.shape)
        vol[mask] = np.nan_to_num(icc)
        name = f"space-{TEMPLATE_SPACE}_res-2_desc-{_label(label)}_stat-icc_statmap.nii.gz"
        ctx.writer.nifti(name, vol, affine, {"Statistic": "ICC(2,1), Shrout & Fleiss 1979",
                                             "NParticipants": int(len(pids)), "Description": label})
        fisher = stats.icc_fisher_pairs(ratings[:, 0], ratings[:, 1])
        ctx.rows.append(_row(label, "voxel", "brain-mask median", "", "icc_2_1", float(np.nanmedian(icc))))
        ctx.rows.append(_row(label, "voxel", "brain-mask median", "", "icc_fisher_eq4",
                             float(np.nanmedian(fisher))))
        ctx.report.setdefault("icc", []).append({"analysis": label, "values": icc[np.isfinite(icc)]})
    if roi_values is not None:
        ratings = roi_values[idx]
        ok = np.all(np.isfinite(ratings), axis=(0, 1))
        icc = stats.icc(ratings[:, :, ok], "2,1")
        for name, v in zip(np.asarray(roi_names)[ok], np.atleast_1d(icc)):
            ctx.rows.append(_row(label, "roi", name, "", "icc_2_1", v))
    if global_values is not None:
        ratings = global_values[idx]
        if np.all(np.isfinite(ratings)):
            ctx.rows.append(_row(label, "global", "whole brain", "", "icc_2_1", stats.icc(ratings, "2,1")))


def _vbm(ctx):
    rows = ctx.scans.index[ctx.scans["gm"].notna()].to_numpy()
    if rows.size < 2:
        return
    LOGGER.info("VBM: %d modulated GM maps", rows.size)
    data, affine = _load_maps(list(ctx.scans.loc[rows, "gm"]), "modulated GM")
    mask = _analysis_mask(ctx, data, rows) & (data.mean(axis=0) >= _GM_MASK_THRESHOLD)
    if not mask.any():
        LOGGER.warning("VBM: no voxel with mean modulated GM >= %.1f; skipped", _GM_MASK_THRESHOLD)
        return
    labels, table = _atlas(ctx, affine, mask.shape)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    present = [k for k in table["index"] if np.any(labels == k)]
    names = table.set_index("index").loc[present, "name"].tolist()
    flat = data.reshape(data.shape[0], -1)
    volumes = _roi_volumes(flat, labels.ravel(), present, voxel_mm3)
    vol_table = ctx.scans.loc[rows, ["participant_id", "session_id"]].reset_index(drop=True)
    vol_table = pd.concat([vol_table, pd.DataFrame(volumes, columns=names)], axis=1)
    ctx.writer.tsv("group_roivolumes.tsv", vol_table, {
        "participant_id": {"Description": "participant"}, "session_id": {"Description": "session"},
        **{n: {"Description": f"GM volume in Harvard-Oxford ROI {n} (max-prob, thr 25%)",
               "Units": "mm^3"} for n in names}})
    ctx.report["roi_volumes"] = (names, volumes)
    ctx.report["vbm_rows"] = rows
    vec = data[:, mask].astype(np.float64)
    del data, flat
    _roi_contrasts(ctx, _VBM, volumes, names, rows, "gm_volume")
    _voxel_contrasts(ctx, _VBM, _VBM, vec, mask, affine, rows, "modulated GM (VBM)")
    _icc_analysis(ctx, _VBM, vec, mask, affine, rows, volumes, names)


def _roi_volumes(flat, labels, present, voxel_mm3):
    from .atlases import roi_volumes

    return roi_volumes(flat, labels, present, voxel_mm3)


def _bias_fits(ctx, model, table):
    """Fit (or load) the global bias correction for one model, apply it, write the JSON."""
    opts = ctx.options
    # one scan per participant: repeated scans must not weigh twice in the fit
    primary = ctx.scans.loc[table.index, "primary"].to_numpy()
    ctrl = primary & (table["group"] == opts.control_label).to_numpy() \
        & np.isfinite(table["age"]).to_numpy() & np.isfinite(table["brain_age"]).to_numpy()
    raw = (table["brain_age"] - table["age"]).to_numpy()
    info = {"model": model, "method": opts.bias_correction, "fitted_on": opts.bias_fit_on}
    if opts.bias_correction == "none":
        corrected = raw
    else:
        spec = _stored_fit(opts.bias_fit_on, model)
        if spec is not None:
            fit = stats.bias_correction_from_dict(spec)
            info["n_fit_stored"] = fit.n_fit
        else:
            if opts.bias_fit_on != "controls":
                LOGGER.warning("%s holds no fit for model %s: fitting on this run's controls",
                               opts.bias_fit_on, model)
                info["fitted_on"] = "controls"
            if ctrl.sum() < 3:
                raise PhenotypeError(f"model {model}: bias correction needs >= 3 controls "
                                     f"({opts.control_label!r}) with ages; found {int(ctrl.sum())}")
            fit = stats.fit_bias_correction(opts.bias_correction, age=table["age"].to_numpy()[ctrl],
                                            predicted=table["brain_age"].to_numpy()[ctrl])
        ok = np.isfinite(table["age"]).to_numpy()
        corrected = np.full(raw.shape, np.nan)
        corrected[ok] = fit.apply(age=table["age"].to_numpy()[ok], predicted=table["brain_age"].to_numpy()[ok])
        info["method"] = fit.method
        info["global"] = fit.to_dict()
    corr = {}
    for name, values in (("before", raw), ("after", corrected)):
        for who, sel in (("controls", ctrl), ("all", primary)):
            keep = sel & np.isfinite(values) & np.isfinite(table["age"].to_numpy())
            if keep.sum() >= 3 and np.ptp(values[keep]) > 0:
                r = stats.pearson(table["age"].to_numpy()[keep], values[keep])
                corr[f"{who}_{name}"] = {"r": r.statistic, "p": r.pvalue, "n": int(keep.sum())}
                ctx.rows.append(_row(model, "global", who, "", f"pearson_pad_age_{name}", r.statistic,
                                     r.df, r.pvalue, np.nan, r.statistic))
    info["pad_age_correlation"] = corr
    if opts.bias_correction != "none":
        ctx.writer.json(f"desc-{_label(model)}_biasfit.json", info)
    return corrected


def _stored_fit(path, model):
    """The global fit for ``model`` in a ``desc-<model>_biasfit.json`` (None if absent)."""
    if path == "controls":
        return None
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"--bias-fit-on {path} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or "method" not in spec:
        raise UsageError(f"--bias-fit-on {path} is not a brainage bias-fit file (no 'method')")
    if spec.get("model") not in (None, model) or "global" not in spec:
        return None
    return spec["global"]


def _global_pad(ctx, bage):
    """Bias correction and every global brain-PAD statistic, per model."""
    opts = ctx.options
    per_model = {}
    for model, tab in bage.groupby("model", sort=True):
        tab = tab.copy()
        tab["group"] = ctx.groups.loc[tab.index].to_numpy()
        tab["brain_pad_corrected"] = _bias_fits(ctx, model, tab)
        per_model[model] = tab
        prim = tab[ctx.scans.loc[tab.index, "primary"].to_numpy() & tab["group"].notna().to_numpy()
                   & np.isfinite(tab["brain_pad_corrected"]).to_numpy()]
        pad = prim["brain_pad_corrected"].to_numpy()
        grp = prim["group"].to_numpy()
        n_con = len(ctx.contrasts)
        for a, b in ctx.contrasts:
            xa, xb = pad[grp == a], pad[grp == b]
            if xa.size < 2 or xb.size < 2:
                continue
            w = stats.welch_ttest(xa, xb)
            ctx.rows.append(_row(model, "global", "whole brain", f"{a}-{b}", "welch_t", w.statistic, w.df,
                                 w.pvalue, min(1.0, w.pvalue * n_con), w.effect_size))
            z = stats.ztest_2samp(xa, xb)
            ctx.rows.append(_row(model, "global", "whole brain", f"{a}-{b}", "ztest_2samp", z.statistic,
                                 np.nan, z.pvalue, min(1.0, z.pvalue * n_con), z.effect_size))
            ks = stats.ks_2samp(xa, xb)
            ctx.rows.append(_row(model, "global", "whole brain", f"{a}-{b}", "ks_2samp", ks.statistic,
                                 np.nan, ks.pvalue, min(1.0, ks.pvalue * n_con)))
        sizes = pd.Series(grp).value_counts()
        keep = np.isin(grp, sizes.index[sizes >= 2])
        if len(sizes[sizes >= 2]) >= 2:
            an = stats.welch_anova(pad[keep], grp[keep])
            ctx.rows.append(_row(model, "global", "whole brain", "all groups", "welch_anova", an.statistic,
                                 an.df[1], an.pvalue, an.pvalue, an.effect_size))
            gh = stats.games_howell(pad[keep], grp[keep])
            for _, r in gh.iterrows():
                ctx.rows.append(_row(model, "global", "whole brain", f"{r.A}-{r.B}", "games_howell", r["T"],
                                     r["df"], r["pval"], r["pval"], r["cohen_d"]))
        numeric = ctx.covs.loc[prim.index].apply(pd.to_numeric, errors="coerce")
        numeric = numeric.loc[:, numeric.notna().sum() >= 3]
        if len(numeric.columns):
            cc = stats.correlate_covariates(pad, numeric.reset_index(drop=True))
            for _, r in cc.iterrows():
                ctx.rows.append(_row(model, "global", r["variable"], "", "pearson_pad_covariate", r["r"],
                                     r["n"] - 2, r["p"], r["p_bonferroni"], r["r"]))
            age = prim["age"].to_numpy()
            sw = stats.sliding_window_correlations(age, pad, numeric.reset_index(drop=True),
                                                   width=10.0, step=float(opts.sliding_window_step))
            for _, r in sw.iterrows():
                ctx.rows.append(_row(model, "global", f"age {r.window_start:g}-{r.window_end:g}: {r.variable}",
                                     "", "pearson_sliding_window", r["r"], r["n"] - 2, r["p"],
                                     r["p_bonferroni"], r["r"]))
    models = sorted(per_model)
    for m1, m2 in combinations(models, 2):
        t1 = per_model[m1].set_index("scan")["brain_pad_corrected"]
        t2 = per_model[m2].set_index("scan")["brain_pad_corrected"]
        both = t1.index.intersection(t2.index)
        x1, x2 = t1.loc[both].dropna(), t2.loc[both].dropna()
        if x1.size >= 2 and x2.size >= 2:
            ks = stats.ks_2samp(x1.to_numpy(), x2.to_numpy())
            ctx.rows.append(_row(f"{m1} vs {m2}", "global", "whole brain", "", "ks_2samp_models",
                                 ks.statistic, np.nan, ks.pvalue, np.nan))
    return per_model


def _brainage_maps(ctx, per_model):
    """Voxel brain-PAD maps: bias correction, ROI PAD, voxel tests, ICC."""
    opts = ctx.options
    models = sorted({m for maps in ctx.scans["brainagemap"] for m in maps})
    for model in models:
        rows = ctx.scans.index[[model in m for m in ctx.scans["brainagemap"]]].to_numpy()
        age = ctx.pheno.loc[rows, "age_years"].to_numpy()   # already holds the tables' ages
        rows = rows[np.isfinite(age)]
        age = age[np.isfinite(age)]
        if rows.size < 2:
            continue
        LOGGER.info("brain-age maps of %s: %d scans", model, rows.size)
        data, affine = _load_maps([ctx.scans.loc[r, "brainagemap"][model] for r in rows], "brain-age")
        mask = _analysis_mask(ctx, data, rows)
        vec = data[:, mask].astype(np.float64)
        del data
        ctrl = (ctx.groups.loc[rows] == opts.control_label).to_numpy() \
            & ctx.scans.loc[rows, "primary"].to_numpy()
        if opts.bias_correction == "none" or ctrl.sum() < 3:
            pad = vec - age[:, None]
        else:
            fit = stats.fit_bias_correction(opts.bias_correction, age=age[ctrl], predicted=vec[ctrl])
            pad = fit.apply(age=age, predicted=vec)
        usable = np.all(np.isfinite(pad), axis=1)
        if not usable.all():
            # age bins without any control (agebin) cannot be corrected: leave those scans out
            LOGGER.warning("%s maps: %d scan(s) in age bins without controls left out: %s", model,
                           (~usable).sum(), ", ".join(ctx.scans.loc[rows[~usable], "scan"]))
            rows, age, vec, pad = rows[usable], age[usable], vec[usable], pad[usable]
        labels, table = _atlas(ctx, affine, mask.shape)
        present = [k for k in table["index"] if np.any(labels[mask] == k)]
        names = table.set_index("index").loc[present, "name"].tolist()
        # seed 000: ROI brain-PAD = mean voxel brain age in the ROI minus age; here from the
        # bias-corrected voxel deltas, which equals that when no correction is asked for
        roi_pad = _roi_means(pad, labels[mask], present)
        _roi_contrasts(ctx, model, roi_pad, names, rows, "roi_brain_pad")
        if "roi_volumes" in ctx.report:
            vnames, volumes = ctx.report["roi_volumes"]
            vrows = ctx.report["vbm_rows"]
            ctrl_rows = rows[ctrl]
            common = np.intersect1d(ctrl_rows, vrows)
            for j, name in enumerate(names):
                if name not in vnames or common.size < 3:
                    continue
                v = volumes[np.searchsorted(vrows, common), vnames.index(name)]
                p_ = roi_pad[np.searchsorted(rows, common), j]
                if np.ptp(v) > 0 and np.ptp(p_) > 0:
                    r = stats.pearson(v, p_)
                    ctx.rows.append(_row(model, "roi", name, "", "pearson_pad_volume", r.statistic, r.df,
                                         r.pvalue, min(1.0, r.pvalue * len(names)), r.statistic))
        _pooled_voxel_tests(ctx, model, pad, rows)
        _voxel_contrasts(ctx, model, model, pad, mask, affine, rows, f"voxel brain-PAD ({model})")
        # reliability of the brain-age predictions themselves (seed 000 Fig. 7)
        _icc_analysis(ctx, model, vec, mask, affine, rows, _roi_means(vec, labels[mask], present), names,
                      np.nanmean(vec, axis=1))


def _roi_means(data, labels, present):
    from .atlases import roi_means

    return roi_means(data, labels, present)


def _pooled_voxel_tests(ctx, model, pad, rows):
    """Seed 000 Table 4 (upper triangle): Welch t on all voxel PADs pooled per group."""
    for a, b in ctx.contrasts:
        sel, is_a, _ = _contrast_rows(ctx, rows, a, b)
        pos = np.searchsorted(rows, sel)
        xa, xb = pad[pos[is_a]].ravel(), pad[pos[~is_a]].ravel()
        xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
        if xa.size >= 2 and xb.size >= 2:
            w = stats.welch_ttest(xa, xb)
            ctx.rows.append(_row(model, "voxel", "all voxels pooled", f"{a}-{b}", "welch_t_pooled_voxels",
                                 w.statistic, w.df, w.pvalue, min(1.0, w.pvalue * len(ctx.contrasts)),
                                 w.effect_size))


@dataclass(frozen=True)
class _RelevanceTest:
    """One seed 002 relevance-map analysis: its permutation result and what the maps mean.

    ``directions`` (``(g1, g2)`` for ``contrast-<g1>Vs<g2>``), ``wording`` and the rows of
    ``effect`` follow the contrast rows of ``result``.
    """

    result: object
    directions: tuple
    wording: tuple
    effect: np.ndarray
    effect_stat: str
    effect_name: str
    t_name: str
    meta: dict


def _relevance_onesample(vec, mask, options, *, random_state=0, n_jobs=1, label="relevance"):
    """One-sample test of mean |relevance| > 0 with sign flipping (seed 002 Fig. 5).

    As in the paper (randomise one-sample t on absolute relevance), the null is a
    distribution of |relevance| symmetric about 0, so it is rejected where relevance is
    non-zero in most scans; sporadically non-zero voxels keep t near 1.

    Parameters
    ----------
    vec : numpy.ndarray, shape (n_scans, n_voxels)
        Masked relevance maps, one scan per participant.
    mask : numpy.ndarray of bool
        The voxels of ``vec`` (C order).
    options : GroupOptions
        Permutations, TFCE and connectivity.
    random_state : int or numpy.random.Generator, default=0
    n_jobs : int, default=1
    label : str, default='relevance'
        Name used in log messages.

    Returns
    -------
    _RelevanceTest or None
        None (with a logged reason) with fewer than 2 scans.
    """
    n = vec.shape[0]
    if n < 2:
        LOGGER.warning("%s: one-sample test of |relevance| needs >= 2 scans, found %d; skipped", label, n)
        return None
    data = np.abs(vec)
    LOGGER.info("%s, mean |relevance| > 0: %d scans, %d sign flips%s", label, n, options.n_perm,
                " + TFCE" if options.tfce else "")
    res = _permutation_test(options, data, np.ones((n, 1)), [[1.0]], mask, random_state, n_jobs)
    sd = data.std(axis=0, ddof=1)
    d = np.divide(data.mean(axis=0), sd, out=np.zeros(data.shape[1]), where=sd > 0)
    return _RelevanceTest(res, (("Mean", "Zero"),), ("mean |relevance| > 0",), d[None],
                          "d", "one-sample Cohen's d of |relevance| (mean / SD)",
                          "one-sample t of |relevance|",
                          {"N": int(n), "Data": "absolute relevance",
                           "Design": "one-sample t (intercept only); sign flipping"})


def _relevance_age_groups(vec, age, mask, options, *, random_state=0, n_jobs=1, label="relevance"):
    """Young (age <= 40) vs old (age >= 60) two-sample test on relevance (seed 002 Fig. 6a).

    Parameters
    ----------
    vec : numpy.ndarray, shape (n_scans, n_voxels)
        Masked signed relevance maps, one scan per participant.
    age : numpy.ndarray, shape (n_scans,)
        Age in years (NaN: not in either group).
    mask : numpy.ndarray of bool
    options : GroupOptions
    random_state : int or numpy.random.Generator, default=0
    n_jobs : int, default=1
    label : str, default='relevance'

    Returns
    -------
    _RelevanceTest or None
        Both directions (old > young, young > old) with the pooled-variance t of
        randomise's unpaired test; None (logged) with fewer than 2 scans in an age group.
    """
    age = np.asarray(age, dtype=float)
    old, young = age >= _OLD_MIN_AGE, age <= _YOUNG_MAX_AGE
    if old.sum() < 2 or young.sum() < 2:
        LOGGER.warning("%s: young (age <= %g) vs old (age >= %g) needs >= 2 scans per group, found "
                       "%d young and %d old; skipped", label, _YOUNG_MAX_AGE, _OLD_MIN_AGE,
                       young.sum(), old.sum())
        return None
    sel = old | young
    design = np.column_stack([old[sel], young[sel]]).astype(float)
    LOGGER.info("%s, old vs young: %d + %d scans, %d permutations%s", label, old.sum(), young.sum(),
                options.n_perm, " + TFCE" if options.tfce else "")
    res = _permutation_test(options, vec[sel], design, [[1.0, -1.0], [-1.0, 1.0]], mask,
                            random_state, n_jobs)
    d = np.nan_to_num(stats.cohens_d(vec[old], vec[young]))
    return _RelevanceTest(res, (("Old", "Young"), ("Young", "Old")), ("Old > Young", "Young > Old"),
                          np.stack([d, -d]), "d", "Cohen's d, pooled SD (seed 000 eq. 3)",
                          "two-sample t, pooled variance",
                          {"NOld": int(old.sum()), "NYoung": int(young.sum()),
                           "AgeGroups": {"Young": f"age <= {_YOUNG_MAX_AGE:g} years",
                                         "Old": f"age >= {_OLD_MIN_AGE:g} years"},
                           "Design": "two-sample t (old, young indicators)"})


def _relevance_pad(vec, pad, age, mask, options, *, random_state=0, n_jobs=1, label="relevance",
                   pad_name="brain-PAD"):
    """Relevance ~ brain-PAD with age and age^2 as covariates (seed 002 Fig. S3).

    GLM ``relevance = b0 + b1 PAD + b2 a + b3 a^2`` (``a`` = centred age), tested on ``b1``
    in both directions with Freedman–Lane permutations. Any brain-PAD correction that is
    linear in age lies in the covariates' span and leaves ``b1`` and its t unchanged.

    Parameters
    ----------
    vec : numpy.ndarray, shape (n_scans, n_voxels)
        Masked relevance maps, one scan per participant.
    pad, age : numpy.ndarray, shape (n_scans,)
        Brain-PAD and age (years); scans with either missing are left out.
    mask : numpy.ndarray of bool
    options : GroupOptions
    random_state : int or numpy.random.Generator, default=0
    n_jobs : int, default=1
    label : str, default='relevance'
    pad_name : str, default='brain-PAD'
        What ``pad`` is (written to the sidecars).

    Returns
    -------
    _RelevanceTest or None
        The effect size is the partial correlation ``t / sqrt(t^2 + dof)``; None (logged)
        with fewer than ``_MIN_PAD_SCANS`` scans or a brain-PAD explained by age and age^2.
    """
    pad, age = np.asarray(pad, dtype=float), np.asarray(age, dtype=float)
    ok = np.isfinite(pad) & np.isfinite(age)
    if ok.sum() < _MIN_PAD_SCANS:
        LOGGER.warning("%s: relevance ~ brain-PAD needs >= %d scans with brain-PAD and age, found %d; "
                       "skipped", label, _MIN_PAD_SCANS, ok.sum())
        return None
    a = age[ok] - age[ok].mean()       # centred: age and age^2 less collinear (t unchanged)
    nuisance = np.column_stack([np.ones(a.size), a, a**2])
    resid = pad[ok] - nuisance @ np.linalg.lstsq(nuisance, pad[ok], rcond=None)[0]
    if not np.linalg.norm(resid) > 1e-8 * max(np.linalg.norm(pad[ok] - pad[ok].mean()), 1e-300):
        LOGGER.warning("%s: brain-PAD is a function of age and age^2 here; relevance ~ brain-PAD skipped",
                       label)
        return None
    design = np.column_stack([nuisance[:, 0], pad[ok], nuisance[:, 1:]])
    LOGGER.info("%s, relevance ~ brain-PAD + age + age^2: %d scans, %d permutations%s", label, ok.sum(),
                options.n_perm, " + TFCE" if options.tfce else "")
    res = _permutation_test(options, vec[ok], design, [[0.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]],
                            mask, random_state, n_jobs)
    r = res.t / np.sqrt(res.t**2 + res.dof)
    return _RelevanceTest(res, (("PAD", "Zero"), ("Zero", "PAD")), ("PAD slope > 0", "PAD slope < 0"),
                          r, "r", "partial correlation of relevance with brain-PAD given age, age^2",
                          "GLM t of the brain-PAD slope adjusted for age and age^2",
                          {"N": int(ok.sum()), "Regressor": pad_name, "Covariates": ["age", "age^2"],
                           "Design": "GLM relevance ~ 1 + brain-PAD + age + age^2; Freedman-Lane"})


def _model_pad(ctx, per_model, model, rows):
    """Brain-PAD of the model behind the relevance maps ``desc-<model>``, for ``rows``.

    The bias-corrected brain-PAD of ``group_brainage.tsv``; the uncorrected one when no
    scan has a corrected value. Returns ``(values, description)``, or ``(None, reason)``.
    """
    names = [m for m in per_model if m == model] or [m for m in per_model if _label(m) == model]
    if not names:
        return None, f"no *_brainage.tsv rows of model {model!r}"
    tab = per_model[names[0]]
    tab = tab[~tab.index.duplicated()]
    corrected = tab["brain_pad_corrected"].reindex(rows).to_numpy(float)
    raw = (tab["brain_age"] - tab["age"]).reindex(rows).to_numpy(float)
    opts = ctx.options
    if opts.bias_correction == "none":
        return raw, f"brain-PAD of {names[0]} (no bias correction asked)"
    if np.isfinite(corrected).any():
        lost = np.isfinite(raw) & ~np.isfinite(corrected)
        if lost.any():
            LOGGER.warning("%s relevance ~ brain-PAD: %d scan(s) without a bias-corrected brain-PAD (e.g. "
                           "age bins without controls) left out", model, lost.sum())
        return corrected, f"bias-corrected brain-PAD of {names[0]} ({opts.bias_correction})"
    LOGGER.warning("%s relevance ~ brain-PAD: no bias-corrected brain-PAD, using the uncorrected brain-PAD "
                   "(a correction linear in age would not change the result: age is a covariate)", model)
    return raw, f"uncorrected brain-PAD of {names[0]}"


def _relevance_maps(ctx, per_model):
    """Relevance maps: group contrasts, then the seed 002 analyses (Figs. 5, 6a and S3).

    Only the maps of the models in ``_PERMUTATION_RELEVANCE`` (``mlens`` and
    ``densenet-clinical``, whose papers asked for these permutation analyses) are tested; the
    Grad-CAM maps of ``vgg-cbv`` are summarised by :func:`_gradcam_age_groups` instead.
    """
    models = sorted({m for maps in ctx.scans["relevancemap"] for m in maps
                     if m in _PERMUTATION_RELEVANCE})
    for model in models:
        rows = ctx.scans.index[[model in m for m in ctx.scans["relevancemap"]]].to_numpy()
        if rows.size < 2:
            continue
        data, affine = _load_maps([ctx.scans.loc[r, "relevancemap"][model] for r in rows], "relevance")
        mask = _analysis_mask(ctx, data, rows)
        label = f"{model}relevance"
        vec = data[:, mask].astype(np.float64)
        del data
        _voxel_contrasts(ctx, label, label, vec, mask, affine, rows, f"relevance maps ({model})")
        # one scan per participant: the first of those with a relevance map
        first = ~ctx.scans.loc[rows, "participant_id"].duplicated().to_numpy()
        sel, svec = rows[first], vec[first]
        age = ctx.pheno.loc[sel, "age_years"].to_numpy(float)
        common = dict(random_state=ctx.rng, n_jobs=ctx.nprocs, label=label)
        tests = [("absrelevance", "permutation_onesample_abs",
                  _relevance_onesample(svec, mask, ctx.options, **common)),
                 ("relevanceagegroup", "permutation_agegroup",
                  _relevance_age_groups(svec, age, mask, ctx.options, **common))]
        pad, source = _model_pad(ctx, per_model, model, sel)
        if pad is None:
            LOGGER.warning("%s: relevance ~ brain-PAD skipped: %s", label, source)
        else:
            LOGGER.info("%s: relevance ~ brain-PAD uses the %s", label, source)
            tests.append(("relevancepad", "permutation_pad_glm",
                          _relevance_pad(svec, pad, age, mask, ctx.options, pad_name=source, **common)))
        for suffix, test_name, test in tests:
            if test is None:
                continue
            for k, ((g1, g2), wording) in enumerate(zip(test.directions, test.wording)):
                meta = {"Description": f"relevance maps ({model}): {wording}", "Contrast": wording,
                        **test.meta}
                _write_direction(ctx, test.result, k, desc=f"{model}{suffix}", label=label, g1=g1, g2=g2,
                                 mask=mask, affine=affine, meta=meta,
                                 t_map=(test.result.t[k], test.t_name),
                                 effect=(test.effect_stat, test.effect[k], test.effect_name),
                                 test=test_name, report_key="relevance_maps", region_label=wording)


def _sum_maps(paths, keys, what):
    """Sum of the 3D maps of each key (float64), one map in memory at a time; (sums, affine).

    Raises
    ------
    ImageError
        When the maps are not all on one grid.
    """
    _, affine, arrays = _maps_on_one_grid(paths, what, np.float64)
    sums = {}
    for data, key in zip(arrays, keys):
        sums[key] = sums[key] + data if key in sums else data
    return sums, affine


def _mean_t1w(ctx, rows, shape, affine):
    """Mean of the scans' MNI-space T1w images, each divided by the mean of its top 1 % brain
    intensities (the seed-003 input normalisation); ``None`` when none is on the maps' grid."""
    from .transforms.mni_affine import top_fraction_mean

    total, n = np.zeros(shape, np.float64), 0
    for path in ctx.scans.loc[rows, "std_t1w"]:
        if path is None:
            continue
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float64)
        if data.shape != tuple(shape) or not np.allclose(img.affine, affine, atol=1e-3) \
                or not np.any(data > 0):
            continue
        total += data / top_fraction_mean(data[data > 0], 0.01)
        n += 1
    return (total / n).astype(np.float32) if n else None


def _gradcam_age_groups(ctx):
    """Mean Grad-CAM map per 10-year age group (seed 003, Fig. 4); no permutation analysis.

    One scan per participant: the first with a map and a known age.  Each group
    ``[lo, lo + 10)`` years gets the voxelwise mean of its maps (the participant level keeps the
    top 20 % of each map) written as
    ``space-…_res-2_desc-<model>age<lo>to<lo+9>_relevancemap.nii.gz``, and the mean of the same
    scans' MNI-space T1w images (:func:`_mean_t1w`) as the report's background.
    """
    for model, model_id in _GRADCAM_AGE_GROUPS.items():
        rows = ctx.scans.index[[model in m for m in ctx.scans["relevancemap"]]].to_numpy()
        age = ctx.pheno.loc[rows, "age_years"].to_numpy(float)
        rows, age = rows[np.isfinite(age)], age[np.isfinite(age)]
        first = ~ctx.scans.loc[rows, "participant_id"].duplicated().to_numpy()
        rows, age = rows[first], age[first]
        if rows.size == 0:
            continue
        lows = (np.floor(age / _GRADCAM_GROUP_YEARS) * _GRADCAM_GROUP_YEARS).astype(int)
        sums, affine = _sum_maps([ctx.scans.loc[r, "relevancemap"][model] for r in rows], lows,
                                 "Grad-CAM")
        groups = []
        for lo in np.unique(lows):
            sel = lows == lo
            hi = int(lo) + _GRADCAM_GROUP_YEARS
            mean = (sums[lo] / sel.sum()).astype(np.float32)
            scans = ctx.scans.loc[rows[sel], "scan"].tolist()
            name = (f"space-{TEMPLATE_SPACE}_res-2_desc-{model}age{lo}to{hi - 1}"
                    "_relevancemap.nii.gz")
            sidecar = {"Description": f"mean Grad-CAM map of {model_id} over the scans aged {lo} <= "
                                      f"age < {hi} years, one per participant; each map keeps the top "
                                      "20 % of its values (Jomsky et al., Fig. 4)",
                       "Model": model_id, "AgeGroup": [int(lo), hi], "N": int(sel.sum()),
                       "MeanAge": float(age[sel].mean()), "Scans": scans}
            path = ctx.writer.nifti(name, mean, affine, sidecar)
            groups.append({"label": f"{lo}-{hi - 1}", "n": int(sel.sum()), "file": path,
                           "map": mean, "t1w": _mean_t1w(ctx, rows[sel], mean.shape, affine)})
        LOGGER.info("%s Grad-CAM: %d scans in age groups %s", model, rows.size,
                    ", ".join(g["label"] for g in groups))
        ctx.report.setdefault("gradcam_age_groups", []).append({"model": model, "groups": groups})


# --------------------------------------------------------------------------- runner


_BRAINAGE_DICT = {
    "participant_id": {"Description": "participant label"},
    "session_id": {"Description": "session label (n/a without sessions)"},
    "scan": {"Description": "entities of the source T1w (sub, ses, acq, ce, rec, run)"},
    "model": {"Description": "brain-age model"},
    "brain_age": {"Description": "predicted brain age", "Units": "year"},
    "age": {"Description": "chronological age at scan", "Units": "year"},
    "brain_pad": {"Description": "brain-predicted age difference, brain_age - age", "Units": "year"},
    "brain_pad_corrected": {"Description": "brain_pad after the age-bias correction fitted on controls "
                                           "(see desc-<model>_biasfit.json)", "Units": "year"},
    "group": {"Description": "group label from the group column"},
}

_STATS_DICT = {
    "model": {"Description": "brain-age model, 'GMvolume' (VBM), '<model>relevance', or 'A vs B' for "
                             "model comparisons"},
    "level": {"Description": "global (one value per scan), roi (Harvard-Oxford ROI) or voxel",
              "Levels": {"global": "whole-brain", "roi": "region of interest", "voxel": "voxelwise"}},
    "region": {"Description": "ROI name, covariate, age window, or peak location"},
    "contrast": {"Description": "'A-B' tests A > B (two-sided unless the test says permutation); "
                                "relevance analyses: 'Mean-Zero' mean |relevance| > 0, 'Old-Young' / "
                                "'Young-Old' age groups, 'PAD-Zero' / 'Zero-PAD' positive / negative "
                                "brain-PAD slope"},
    "test": {"Description": "test name", "Levels": {
        "welch_t": "Welch t-test, Welch-Satterthwaite df (seed 000 eqs. 1-2); effect_size = Cohen's d (eq. 3)",
        "welch_t_gm_volume": "Welch t on ROI GM volume (mm^3); p_corrected Bonferroni over ROIs",
        "welch_t_roi_brain_pad": "Welch t on ROI brain-PAD (seed 000 Table 5); Bonferroni over ROIs",
        "welch_t_pooled_voxels": "Welch t on all voxel PADs pooled per group (seed 000 Table 4)",
        "ztest_2samp": "two-sample Z-test, pooled variance (seed 004)",
        "ks_2samp": "two-sample Kolmogorov-Smirnov test (seed 001)",
        "ks_2samp_models": "KS test between the PAD distributions of two models (seed 001)",
        "welch_anova": "Welch ANOVA (seed 004); df = denominator df; effect_size = eta squared",
        "games_howell": "Games-Howell pairwise test (seed 004); p already family-wise adjusted",
        "pearson_pad_age_before": "Pearson r of brain-PAD with age before bias correction",
        "pearson_pad_age_after": "Pearson r of brain-PAD with age after bias correction",
        "pearson_pad_covariate": "Pearson r of corrected brain-PAD with a covariate (seed 001); Bonferroni",
        "pearson_sliding_window": "Pearson r in a 10-year sliding age window (seed 002 Fig. 7); "
                                  "Bonferroni per window",
        "pearson_pad_volume": "Pearson r of ROI brain-PAD with ROI GM volume in controls (seed 000 Table 3)",
        "permutation_tfce_fwe": "TFCE permutation inference; statistic = peak TFCE, p = p_FWE at the "
                                "peak, p_corrected = smallest p_FWE, effect_size = d at the peak",
        "permutation_maxt_fwe": "voxelwise max-t permutation inference (as above, with t)",
        "permutation_onesample_abs_tfce_fwe": "one-sample TFCE sign-flip test of mean |relevance| > 0 "
                                              "(seed 002 Fig. 5), one scan per participant; statistic = "
                                              "peak TFCE, p = p_FWE at the peak, p_corrected = smallest "
                                              "p_FWE, effect_size = one-sample d at the peak",
        "permutation_onesample_abs_maxt_fwe": "as permutation_onesample_abs_tfce_fwe, with t",
        "permutation_agegroup_tfce_fwe": "TFCE two-sample permutation test of relevance, old (age >= 60) vs "
                                         "young (age <= 40) (seed 002 Fig. 6a); columns as "
                                         "permutation_tfce_fwe, effect_size = d at the peak",
        "permutation_agegroup_maxt_fwe": "as permutation_agegroup_tfce_fwe, with t",
        "permutation_pad_glm_tfce_fwe": "TFCE Freedman-Lane test of the brain-PAD slope in relevance ~ "
                                        "brain-PAD + age + age^2 (seed 002 Fig. S3); columns as "
                                        "permutation_tfce_fwe, effect_size = partial r at the peak",
        "permutation_pad_glm_maxt_fwe": "as permutation_pad_glm_tfce_fwe, with t",
        "icc_2_1": "ICC(2,1), Shrout & Fleiss 1979, first two scans of each repeated participant",
        "icc_fisher_eq4": "Fisher's pairwise ICC (seed 000 eq. 4)"}},
    "statistic": {"Description": "value of the test statistic"},
    "df": {"Description": "degrees of freedom (n/a when none)"},
    "p": {"Description": "p-value"},
    "p_corrected": {"Description": "corrected p-value (Bonferroni or FWE, see test)"},
    "effect_size": {"Description": "Cohen's d (pooled SD), eta squared, or r (see test)"},
}


def run_group_level(bids_dir, output_dir, options, *, random_seed=0, nprocs=1):
    """Run every group-level statistic and write the group outputs.

    Parameters
    ----------
    bids_dir : pathlib.Path
        Raw BIDS dataset (participants.tsv, sessions.tsv).
    output_dir : pathlib.Path
        Derivatives folder the participant level filled.
    options : GroupOptions
    random_seed : int, default=0
        Seed of the permutation generator.
    nprocs : int, default=1
        Worker processes for permutations.

    Returns
    -------
    GroupResult

    Raises
    ------
    bidsapp.errors.InputMissingError
        No participant outputs in ``output_dir``.
    bidsapp.errors.PhenotypeError
        Unknown group/covariate column or group label (the message lists what exists).
    """
    if not isinstance(options, GroupOptions):
        raise TypeError(f"'options' must be GroupOptions; got {type(options).__name__}")
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise UsageError(f"'nprocs' must be an integer >= 1; got {nprocs!r}")
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    if not output_dir.is_dir():
        raise InputMissingError(f"output_dir {output_dir} does not exist; run the participant level first")
    if options.bias_fit_on != "controls" and not Path(options.bias_fit_on).is_file():
        raise InputMissingError(f"--bias-fit-on file {options.bias_fit_on} does not exist")
    scans = _collect_outputs(output_dir)
    pheno = _phenotypes(bids_dir, scans)
    groups, contrasts, covs = _resolve_design(scans, pheno, options)
    bage = _read_brainage(scans)
    if not bage.empty:
        index = dict(zip(scans["scan"], scans.index))
        bage.index = bage["scan"].map(index).to_numpy()
        # ages: the participant level's value when it recorded one, else the phenotype tables
        fallback = pheno.loc[bage.index, "age_years"].to_numpy()
        bage["age"] = np.where(np.isfinite(bage["age"]), bage["age"], fallback)
        first_age = bage.groupby(level=0)["age"].first()
        pheno.loc[first_age.index, "age_years"] = np.where(
            np.isfinite(first_age), first_age, pheno.loc[first_age.index, "age_years"])
        covs = _resolve_design(scans, pheno, options)[2]
    ctx = _Context(output_dir, options, scans, pheno, groups, contrasts, covs, _Writer(output_dir),
                   np.random.default_rng(random_seed), nprocs)
    ctx.summary.update({
        "n_scans": int(len(scans)), "n_participants": int(scans["participant_id"].nunique()),
        "groups": {str(k): int(v) for k, v in groups[scans["primary"]].value_counts().items()},
        "contrasts": [f"{a}-{b}" for a, b in contrasts],
        "models": sorted(bage["model"].unique().tolist()) if not bage.empty else []})
    LOGGER.info("group level: %d scans of %d participants, groups %s, contrasts %s",
                ctx.summary["n_scans"], ctx.summary["n_participants"], ctx.summary["groups"],
                ctx.summary["contrasts"])

    per_model = _global_pad(ctx, bage) if not bage.empty else {}
    _write_brainage_table(ctx, per_model)
    _vbm(ctx)
    _brainage_maps(ctx, per_model)
    _relevance_maps(ctx, per_model)
    _gradcam_age_groups(ctx)

    stats_table = pd.DataFrame(ctx.rows, columns=_STATS_COLUMNS)
    ctx.writer.tsv("group_stats.tsv", stats_table, _STATS_DICT)
    from .reports.group import write_group_report

    ctx.writer.files.append(write_group_report(output_dir, ctx.report_data(per_model, stats_table)))
    return GroupResult(tuple(ctx.writer.files), ctx.summary)


def _write_brainage_table(ctx, per_model):
    base = ["participant_id", "session_id", "scan", "model", "brain_age", "age", "brain_pad",
            "brain_pad_corrected", "group"]
    cov_cols = [c for c in ctx.options.covariates if c not in base]
    frames = []
    for model, tab in per_model.items():
        out = pd.DataFrame({
            "participant_id": ctx.scans.loc[tab.index, "participant_id"].to_numpy(),
            "session_id": ctx.scans.loc[tab.index, "session_id"].to_numpy(),
            "scan": tab["scan"].to_numpy(), "model": model, "brain_age": tab["brain_age"].to_numpy(),
            "age": tab["age"].to_numpy(), "brain_pad": (tab["brain_age"] - tab["age"]).to_numpy(),
            "brain_pad_corrected": tab["brain_pad_corrected"].to_numpy(), "group": tab["group"].to_numpy()})
        for c in cov_cols:
            out[c] = ctx.covs.loc[tab.index, c].to_numpy()
        frames.append(out)
    cols = base + cov_cols
    table = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    ctx.writer.tsv("group_brainage.tsv", table,
                   {**_BRAINAGE_DICT, **{c: {"Description": f"covariate {c}"} for c in cov_cols}})
    ctx.report["brainage"] = table
