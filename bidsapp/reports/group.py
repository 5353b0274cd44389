"""The group HTML report (``group.html``) of the group level.

Figures are written to ``output_dir/figures/group_*.svg`` (PNG when large) with the
helpers of :mod:`bidsapp.reports.figures` and linked from one self-describing page:
predicted vs chronological age before and after the bias correction, brain-PAD per
group, effect-size and FWE maps (slices and glass brains), the mean Grad-CAM map per age
group (vgg-cbv), ROI tables, the ICC histogram, the statistics tables and the methods text.
"""

from __future__ import annotations

import html
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import __version__
from ..derivatives import atomic_write
from .figures import cuts_from_mask, plot_overlay, save_figure

__all__ = ["write_group_report", "methods_text"]

LOGGER = logging.getLogger("brainage.reports.group")
_MAX_TABLE_ROWS = 12


def _e(value):
    return html.escape(str(value))


def _fmt(value, digits=3):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if not np.isfinite(v):
        return "n/a"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def _figure(width=6.0, height=4.0):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _img_tag(output_dir, path, alt):
    rel = Path(path).relative_to(output_dir).as_posix()
    return (f'<figure><img src="{_e(rel)}" alt="{_e(alt)}" style="max-width:100%">'
            f"<figcaption>{_e(alt)}</figcaption></figure>")


def _save(fig, output_dir, name):
    return save_figure(fig, output_dir / "figures" / f"group_{name}.svg")


def _age_figures(output_dir, table):
    """Predicted vs chronological age before/after correction, and PAD per group."""
    parts = []
    for model, tab in table.groupby("model", sort=True):
        tab = tab[np.isfinite(tab["age"].to_numpy(float))]
        if tab.empty:
            continue
        fig = _figure(10, 4.2)
        groups = sorted(tab["group"].dropna().unique())
        lo, hi = float(tab["age"].min()) - 5, float(tab["age"].max()) + 5
        for k, (col, title) in enumerate((("brain_pad", "before correction"),
                                          ("brain_pad_corrected", "after correction"))):
            ax = fig.add_subplot(1, 2, k + 1)
            for g in groups:
                sub = tab[tab["group"] == g]
                ax.scatter(sub["age"], sub["age"] + sub[col], s=14, alpha=0.75, label=str(g))
            ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--")
            ax.set(xlabel="chronological age (years)", ylabel="brain age (years)",
                   title=f"{model}: {title}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = _save(fig, output_dir, f"desc-{_safe(model)}_agescatter")
        parts.append(_img_tag(output_dir, path, f"{model}: predicted vs chronological age "
                                                "(dashed: identity); right: after bias correction"))
        fig = _figure(6, 4)
        ax = fig.add_subplot(1, 1, 1)
        data = [tab.loc[tab["group"] == g, "brain_pad_corrected"].dropna().to_numpy() for g in groups]
        keep = [i for i, d in enumerate(data) if d.size]
        if keep:
            ax.violinplot([data[i] for i in keep], positions=keep, showextrema=False)
            ax.boxplot([data[i] for i in keep], positions=keep, widths=0.25)
            ax.set_xticks(keep, [str(groups[i]) for i in keep])
        ax.axhline(0, color="k", lw=0.8, ls=":")
        ax.set(ylabel="corrected brain-PAD (years)", title=f"{model}: brain-PAD by group")
        fig.tight_layout()
        path = _save(fig, output_dir, f"desc-{_safe(model)}_padbygroup")
        parts.append(_img_tag(output_dir, path, f"{model}: bias-corrected brain-PAD per group"))
    return parts


def _safe(text):
    return "".join(ch for ch in str(text) if ch.isalnum()) or "x"


def _map_figures(output_dir, entry, alpha):
    """Slices of the effect-size map and glass brain of the FWE map for one directed contrast."""
    import nibabel as nib
    from nilearn import datasets, plotting

    parts = []
    d_img = nib.load(entry["effect"])
    e_label, e_stat = entry.get("effect_label", "Cohen's d"), entry.get("effect_stat", "d")
    p_img = nib.load(entry["pfwe"])
    mask = np.asarray(p_img.dataobj) > 0
    if not mask.any():
        return parts
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), p_img.affine)
    tag = entry.get("tag") or f"desc-{_safe(entry['analysis'])}_contrast-{_safe(entry['contrast'])}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cuts = cuts_from_mask(mask_img, n_cuts=6, axes=("z",))
            fig = plot_overlay(datasets.MNI152_FILE_PATH, d_img, cuts=cuts, cmap="RdBu_r",
                               label=e_label, title=f"{entry['analysis']}: {entry['contrast']} ({e_stat})")
            path = _save(fig, output_dir, f"{tag}_stat-{_safe(e_stat)}")
            parts.append(_img_tag(output_dir, path, f"{entry['analysis']}, {entry['contrast']}: {e_label}"))
        except Exception as exc:  # a figure must never stop the report
            LOGGER.warning("%s map figure failed: %s", e_stat, exc)
        sig = np.where(mask & (np.asarray(p_img.dataobj) <= alpha),
                       1.0 - np.asarray(p_img.dataobj, dtype=float), 0.0)
        try:
            fig = _figure(8, 3)
            plotting.plot_glass_brain(nib.Nifti1Image(sig.astype(np.float32), p_img.affine), figure=fig,
                                      threshold=1e-6, vmin=1 - alpha, vmax=1.0, cmap="hot", colorbar=True,
                                      plot_abs=False,
                                      title=f"1 - p_FWE <= {alpha} ({entry['n_significant']} voxels)")
            path = _save(fig, output_dir, f"{tag}_stat-pfwe")
            parts.append(_img_tag(output_dir, path, f"{entry['analysis']}, {entry['contrast']}: voxels with "
                                                    f"p_FWE <= {alpha} (glass brain, shown as 1 - p)"))
        except Exception as exc:
            LOGGER.warning("glass brain figure failed: %s", exc)
    return parts


def _icc_figure(output_dir, entry):
    fig = _figure(5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(entry["values"], bins=50, range=(-1, 1), color="steelblue")
    ax.axvline(0.9, color="k", ls="--", lw=0.8)
    ax.set(xlabel="ICC(2,1)", ylabel="voxels", title=f"{entry['analysis']}: voxel ICC")
    fig.tight_layout()
    path = _save(fig, output_dir, f"desc-{_safe(entry['analysis'])}_icchist")
    return _img_tag(output_dir, path, f"{entry['analysis']}: histogram of voxel ICC(2,1) "
                                      "(dashed: 0.9)")


def _gradcam_figure(output_dir, entry):
    """Mean Grad-CAM map per age group over the group's mean T1w (seed 003, Fig. 4).

    One row per age group; per view (sagittal, coronal, axial) the slice with the largest area
    of non-zero map values, as the paper chose its slices.  One colour scale for all groups.
    """
    from ..explain.gradcam import max_area_slices

    groups = entry["groups"]
    values = np.concatenate([g["map"][g["map"] > 0] for g in groups]) if groups else np.array([])
    vmax = float(np.percentile(values, 99)) if values.size else 1.0
    fig = _figure(7.5, 2.3 * len(groups) + 0.6)
    views = (("sagittal", 0), ("coronal", 1), ("axial", 2))
    image = None
    for row, group in enumerate(groups):
        cam = group["map"]
        t1w = group["t1w"] if group["t1w"] is not None else np.zeros_like(cam)
        cuts = max_area_slices(cam)
        for col, (view, axis) in enumerate(views):
            ax = fig.add_subplot(len(groups), 3, 3 * row + col + 1)
            index = [slice(None)] * 3
            index[axis] = cuts[axis]
            background, overlay = t1w[tuple(index)].T, cam[tuple(index)].T
            ax.imshow(background, cmap="gray", origin="lower", vmin=0,
                      vmax=float(np.percentile(t1w[t1w > 0], 99.5)) if np.any(t1w > 0) else 1.0)
            image = ax.imshow(np.ma.masked_less_equal(overlay, 0), cmap="hot", origin="lower",
                              vmin=0, vmax=vmax, alpha=0.85)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{group['label']} y (n={group['n']})")
            if row == 0:
                ax.set_title(view)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="Grad-CAM (top 20 %)")
    path = _save(fig, output_dir, f"desc-{_safe(entry['model'])}_gradcamagegroups")
    return _img_tag(output_dir, path, f"{entry['model']}: mean top-20 % Grad-CAM map per 10-year "
                                      "age group over the group's mean T1w; per view the slice with "
                                      "the largest area of non-zero values (Jomsky et al., Fig. 4)")


def _table(frame, columns=None):
    columns = columns or list(frame.columns)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r[c]) if not isinstance(r[c], str) else _e(r[c])}</td>"
                                    for c in columns) + "</tr>" for _, r in frame.iterrows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def methods_text(options, summary):
    """The methods paragraph of the report (also useful in a paper).

    Parameters
    ----------
    options : dict
        ``GroupOptions.to_dict()``.
    summary : dict
        ``GroupResult.summary``.

    Returns
    -------
    str
        Plain text.
    """
    bias = {
        "linear-age": "a linear regression of brain-PAD on chronological age, subtracted "
                      "(Popescu et al., eqs. 6-7; de Lange & Cole 2020)",
        "linear-predicted": "a linear regression of brain-PAD on predicted age, subtracted "
                            "(Popescu et al., eq. 8)",
        "extremes": "a line predicted = a*age + b fitted on the youngest and oldest 5% of controls, "
                    "corrected prediction y' = y + age - (a*age + b) (Kim et al.)",
        "agebin": "the voxelwise age-bin method (5-year bins, first 18-25 y; the mean control delta of "
                  "each bin subtracted per voxel; Popescu et al., eq. 9)",
        "none": "no age-bias correction"}[options["bias_correction"]]
    fitted = "controls" if options["bias_fit_on"] == "controls" else f"a stored fit ({options['bias_fit_on']})"
    covs = ", ".join(options["covariates"]) or "none"
    steps = ("step = max(unpermuted t)/100 reused for every permutation as in FSL randomise -T"
             if options["tfce_steps"] == "fixed" else "100 steps from each map's maximum as in nilearn")
    inference = (f"threshold-free cluster enhancement (TFCE; H = 2, E = 0.5, "
                 f"{options['connectivity']}-connectivity, {steps})" if options["tfce"]
                 else "the voxelwise t statistic")
    return (
        f"Group statistics were computed with brainage {__version__} on {summary.get('n_scans', 0)} scans of "
        f"{summary.get('n_participants', 0)} participants (groups: "
        f"{', '.join(f'{k} n={v}' for k, v in summary.get('groups', {}).items())}). Between-group analyses "
        f"used the first scan of each participant; repeated scans entered intraclass correlations "
        f"(ICC(2,1), Shrout & Fleiss 1979). Brain-age delta (brain-PAD = predicted minus chronological age) "
        f"was corrected for age bias with {bias}, fitted on {fitted} and applied to all participants; the "
        f"correlation of brain-PAD with age is reported before and after correction. Groups were compared "
        f"with Welch's t-test with Welch-Satterthwaite degrees of freedom and Cohen's d with the pooled "
        f"standard deviation at global, region-of-interest (Harvard-Oxford cortical and subcortical atlas, "
        f"maximum probability, 25% threshold) and voxel level, Bonferroni-corrected (Popescu et al.); with "
        f"Welch's ANOVA and Games-Howell post-hoc tests and the two-sample Z-test (Kim et al.); and with "
        f"two-sample Kolmogorov-Smirnov tests (Ijishakin et al.). Pearson correlations of brain-PAD with "
        f"the numeric covariates were computed over all participants and in overlapping 10-year sliding age "
        f"windows (step {options['sliding_window_step']:g} years) with Bonferroni correction per window "
        f"(Hofmann et al.). Regional grey-matter volumes (mm^3) were summed from Jacobian-modulated GM maps. "
        f"Voxelwise inference used nonparametric permutation tests equivalent to FSL randomise (GLM with "
        f"covariates: {covs}; Freedman-Lane; {options['n_perm']} relabellings including the unpermuted one, "
        f"all relabellings when fewer) on {inference}, with family-wise error control by the maximum "
        f"statistic, one-sided in each contrast direction; significance at p_FWE <= {options['alpha']}.")


def write_group_report(output_dir, data):
    """Write ``group.html`` (and its figures) from the group level's results.

    Parameters
    ----------
    output_dir : pathlib.Path
        Derivatives folder; figures go to ``figures/``.
    data : dict
        What :func:`bidsapp.group.run_group_level` collected: ``options``, ``summary``,
        ``stats`` (the group_stats table), and optionally ``brainage``, ``voxel_maps``,
        ``relevance_maps``, ``gradcam_age_groups``, ``roi_tables`` and ``icc``.

    Returns
    -------
    pathlib.Path
        The report's path.
    """
    output_dir = Path(output_dir)
    options, summary = data["options"], data["summary"]
    alpha = options["alpha"]
    sections = []
    groups = "".join(f"<li>{_e(k)}: {v}</li>" for k, v in summary.get("groups", {}).items())
    sections.append(
        f"<h2>Summary</h2><p>{summary.get('n_scans', 0)} scans of {summary.get('n_participants', 0)} "
        f"participants. Contrasts: {_e(', '.join(summary.get('contrasts', [])) or 'none')}. Models: "
        f"{_e(', '.join(summary.get('models', [])) or 'none (VBM only)')}.</p><ul>{groups}</ul>")
    stats_table = data["stats"]
    brainage = data.get("brainage")
    if brainage is not None and len(brainage):
        parts = _age_figures(output_dir, brainage)
        glob = stats_table[stats_table["level"] == "global"]
        sections.append("<h2>Brain age</h2>" + "".join(parts) + "<h3>Global statistics</h3>" + _table(glob))
    # relevance analyses: figures only where something survived (up to 5 directions per model)
    for key, title, intro, all_figures in (
            ("voxel_maps", "Voxelwise group differences", "", True),
            ("relevance_maps", "Relevance maps (Hofmann et al.)",
             "<p>One scan per participant: one-sample sign-flip test of |relevance| (where relevance is "
             "consistently non-zero), old (age &ge; 60) vs young (age &le; 40), and the brain-PAD slope "
             "with age and age&sup2; as covariates (Freedman-Lane; effect size: partial r). Figures "
             "are shown for directions with significant voxels.</p>", False)):
        maps = data.get(key, [])
        if not maps:
            continue
        parts = [intro]
        for entry in maps:
            parts.append(f"<h3>{_e(entry['analysis'])}: {_e(entry['contrast'])}</h3><p>{entry['n_significant']}"
                         f" of {entry['n_voxels']} voxels at p_FWE &le; {alpha}.</p>")
            if all_figures or entry["n_significant"]:
                parts.extend(_map_figures(output_dir, entry, alpha))
        sections.append(f"<h2>{title}</h2>" + "".join(parts))
    gradcam = data.get("gradcam_age_groups", [])
    if gradcam:
        parts = ["<p>The participant level keeps the top 20 % of each participant's Grad-CAM map "
                 "of the vgg-cbv T1w encoder (last convolution block); here they are averaged per "
                 "10-year age group, one scan per participant, without a permutation test (as in "
                 "Jomsky et al.). The mean maps are written as NIfTI files:</p>"]
        for entry in gradcam:
            rows = pd.DataFrame([{"age group (years)": g["label"], "n": g["n"],
                                  "mean map": Path(g["file"]).name} for g in entry["groups"]])
            parts.append(_table(rows))
            try:
                parts.append(_gradcam_figure(output_dir, entry))
            except Exception as exc:  # a figure must never stop the report
                LOGGER.warning("Grad-CAM age-group figure failed: %s", exc)
        sections.append("<h2>Grad-CAM by age group (Jomsky et al.)</h2>" + "".join(parts))
    rois = data.get("roi_tables", [])
    if rois:
        parts = []
        for entry in rois:
            frame = pd.DataFrame(entry["rows"], columns=["ROI", "t", "p", "p_bonferroni", "d"])
            frame = frame.reindex(frame["t"].abs().sort_values(ascending=False).index).head(_MAX_TABLE_ROWS)
            parts.append(f"<h3>{_e(entry['analysis'])} ({_e(entry['what'])}): {_e(entry['contrast'])}</h3>"
                         + _table(frame))
        sections.append("<h2>Regions of interest (Harvard-Oxford)</h2><p>Largest |t| first; "
                        "Welch t, Bonferroni over ROIs, Cohen's d.</p>" + "".join(parts))
    icc = data.get("icc", [])
    if icc:
        sections.append("<h2>Reliability (repeated scans)</h2>"
                        + "".join(_icc_figure(output_dir, e) for e in icc))
    sections.append(f"<h2>Methods</h2><p>{_e(methods_text(options, summary))}</p>")
    sections.append(f"<h2>All statistics</h2><p>{len(stats_table)} rows; full table in group_stats.tsv.</p>"
                    + _table(stats_table.head(200)))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>brainage group report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px}"
        "figure{margin:1em 0}</style></head><body>"
        f"<h1>brainage {__version__}: group report</h1>" + "".join(sections) + "</body></html>")
    path = output_dir / "group.html"
    with atomic_write(path, "w") as handle:
        handle.write(page)
    return path
