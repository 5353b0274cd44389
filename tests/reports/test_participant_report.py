"""The per-participant HTML report, built from synthetic derivatives."""

from __future__ import annotations

import html
import importlib.metadata
import importlib.resources
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from report_synthetic import write_map, write_unit

from bidsapp import __version__
from bidsapp.derivatives import SourceEntities, derivative_path, write_brainage_table
from bidsapp.errors import InputMissingError
from bidsapp.reports import (find_units, generate_participant_report, software_versions,
                             summarize_units, unit_summary)

RUN1 = SourceEntities("01", session="A", run="1")
RUN2 = SourceEntities("01", session="A", run="2")
SES_B = SourceEntities("01", session="B")
QC1 = {"mask_volume_ml": 1234.5678, "gm_volume_ml": 612.34, "wm_volume_ml": 498.76,
       "csf_volume_ml": 123.45, "registration_similarity": 0.87654,
       "registration_similarity_metric": "CC (higher is better)", "oblique": True,
       "thick_slice": False, "warnings": [], "seconds": {"n4": 12.5, "registration": 60.26}}
QC2 = {"mask_volume_ml": 1111.0, "warnings": ["skull-stripped input & <odd> contrast"],
       "flags": {"anisotropic": True}}
ERRORS = ["sub-01/ses-B/anat/sub-01_ses-B_T1w.nii.gz: RuntimeError: <boom> & co"]
METHODS = "First paragraph about N4.\n\nSecond paragraph about registration."


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("derivatives")
    write_unit(out, RUN1, qc=QC1)
    write_brainage_table(derivative_path(out, RUN1, suffix="brainage", extension=".tsv"), [
        {"model": "local-unet", "brain_age": 41.23, "brain_age_lower": 35.0,
         "brain_age_upper": 47.94, "age": 38.78},
        {"model": "ensemble", "brain_age": 40.0, "brain_age_lower": None,
         "brain_age_upper": None, "age": None}])
    write_map(out, RUN1, "localunet", "relevancemap")
    write_unit(out, RUN2, qc=QC2, parts=("preproc",))  # crashed after the bias correction
    path = generate_participant_report(out, "sub-01", run_uuid="20261122-abcd", methods=METHODS,
                                       errors=ERRORS, units=[SES_B],
                                       extra_versions={"model local-unet": "sha256:0123"})
    return out, path, path.read_text(encoding="utf-8")


def _sections(text: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)"[^>]*>(.*?)</section>', text, flags=re.S))


def test_report_written_atomically_at_output_root(report):
    out, path, text = report
    assert path == out / "sub-01.html"
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not [p for p in out.rglob("*") if ".part" in p.name]
    assert "$" not in text  # every template placeholder was filled


def test_sections_per_unit_in_order(report):
    _, _, text = report
    ids = re.findall(r'<section id="([^"]+)"', text)
    assert ids == ["summary", "sub-01_ses-A_run-1", "sub-01_ses-A_run-2", "sub-01_ses-B",
                   "errors", "methods"]


def test_summary_numbers_from_qc_json(report):
    _, _, text = report
    run1 = _sections(text)["sub-01_ses-A_run-1"]
    for shown in ("1,234.6", "612.3", "498.8", "123.5", "0.8765", "CC (higher is better)",
                  "oblique"):
        assert shown in run1
    assert "thick_slice" not in run1  # false flags are not listed
    assert '<td>registration</td><td class="num">60.3</td>' in run1  # seconds per stage
    overview = _sections(text)["summary"]
    assert "1,234.6" in overview and "1 of 3" in overview


def test_figures_referenced_exist_under_subject_figures(report):
    out, _, text = report
    sources = re.findall(r'<img[^>]* src="([^"]+)"', text)
    names = {Path(s).name.rsplit(".", 1)[0] for s in sources}
    assert names == {"sub-01_ses-A_run-1_desc-brainmask_T1w",
                     "sub-01_ses-A_run-1_desc-segmentation_dseg",
                     "sub-01_ses-A_run-1_space-MNI152NLin2009aSym_desc-registration_T1w",
                     "sub-01_ses-A_run-1_space-MNI152NLin2009aSym_desc-registrationref_T1w",
                     "sub-01_ses-A_run-1_space-MNI152NLin2009aSym_res-2_desc-localunet_relevancemap"}
    for src in sources:
        assert src.startswith("sub-01/figures/")  # relative, sessions share one folder
        figure = out / html.unescape(src)
        assert figure.is_file() and figure.stat().st_size < 1_100_000
        if figure.suffix == ".svg":
            assert ET.parse(figure).getroot().tag.endswith("svg")
        else:
            assert figure.read_bytes()[:4] == b"\x89PNG"


def test_errors_section_lists_given_errors_escaped(report):
    _, _, text = report
    errors = _sections(text)["errors"]
    assert "RuntimeError: &lt;boom&gt; &amp; co" in errors
    assert "<boom>" not in text


def test_brainage_rows_only_where_a_table_exists(report):
    _, _, text = report
    sections = _sections(text)
    run1 = sections["sub-01_ses-A_run-1"]
    row = re.search(r"<tr><td>local-unet</td>(.*?)</tr>", run1).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells == ["41.2", "[35.0, 47.9]", "38.8", "2.5"]  # brain_pad = 41.23 - 38.78
    ensemble = re.search(r"<tr><td>ensemble</td>(.*?)</tr>", run1).group(1)
    assert re.findall(r"<td[^>]*>(.*?)</td>", ensemble) == ["40.0", "n/a", "n/a", "n/a"]
    assert "Brain age" not in sections["sub-01_ses-A_run-2"]


def test_gradcam_map_of_vgg_cbv_gets_its_own_figure(tmp_path):
    import nibabel as nib
    import numpy as np

    from bidsapp.explain.gradcam import top_fraction_map

    write_unit(tmp_path, RUN1, qc=QC1, parts=("mni",))
    path = write_map(tmp_path, RUN1, "vggcbv", "relevancemap")
    img = nib.load(path)  # a Grad-CAM map is non-negative and keeps its top 20 % (seed 003)
    data = np.clip(img.get_fdata(), 0, None)
    nib.save(nib.Nifti1Image(top_fraction_map(data, 0.2, mask=data > 0), img.affine), path)
    write_brainage_table(derivative_path(tmp_path, RUN1, suffix="brainage", extension=".tsv"), [
        {"model": "vgg-cbv", "brain_age": 50.0, "brain_age_lower": 45.0, "brain_age_upper": 55.0,
         "age": 48.0}], provenance={"vgg-cbv": {"Branches": "T1w", "Stack": "T",
                                                "Notes": ["sex missing (participants.tsv)"]}})
    text = generate_participant_report(tmp_path, "01", run_uuid="r").read_text(encoding="utf-8")
    section = _sections(text)["sub-01_ses-A_run-1"]
    assert "<li>vgg-cbv: branches T1w, stack T; sex missing (participants.tsv)</li>" in section
    assert "<h3>Explanation map: vggcbv (Grad-CAM)</h3>" in section
    assert "top 20 % of its values" in section and "largest area of kept voxels" in section
    figure = tmp_path / "sub-01" / "figures" / (path.name.split(".")[0] + ".svg")
    if not figure.is_file():
        figure = figure.with_suffix(".png")
    assert figure.is_file() and figure.relative_to(tmp_path).as_posix() in section


def test_diffusion_ae_section_shows_the_slices_and_the_numbers(tmp_path):
    import numpy as np
    from nilearn import datasets

    from bidsapp.inference.diffusion_ae import slice_image
    from bidsapp.transforms.mni_slice import MNISliceSpec, prepare_slice_views

    write_unit(tmp_path, RUN1, qc=QC1, parts=("mni",))
    spec = MNISliceSpec(grid_size=65, size=48)
    brain = prepare_slice_views(datasets.load_mni152_template(resolution=2), spec)[0]
    recon = np.clip(brain + 0.05 * np.sin(np.arange(48))[:, None], 0, 1)
    for suffix, data in (("inputslice", brain), ("reconslice", recon),
                         ("reconerrorslice", np.abs(recon - brain))):
        path = derivative_path(tmp_path, RUN1, space="MNI152NLin2009aSym", desc="diffusionae",
                               suffix=suffix)
        slice_image(data, spec).to_filename(path)
    provenance = {"diffusion-ae": {
        "Folds": [0, 1, 2], "MCDropoutSamplesPerFold": 50, "MCDropoutSD": 3.456, "Notes": [],
        "ViewsZmm": [22.73, 18.35, 27.11],
        "Reconstruction": {"Fold": 0, "DDIMSteps": 100, "SSIM": 0.91234, "PSNR": 27.5,
                           "CrossValidation": {"held_out_scans": 134, "ssim_mean": 0.9,
                                               "ssim_sd": 0.02, "psnr_db_mean": 26.0,
                                               "psnr_db_sd": 1.5}}},
        "vgg-cbv": {"Branches": "T1w", "Stack": "T", "Notes": []}}
    write_brainage_table(derivative_path(tmp_path, RUN1, suffix="brainage", extension=".tsv"), [
        {"model": "diffusion-ae", "brain_age": 61.04, "brain_age_lower": 52.5,
         "brain_age_upper": 70.25, "age": 60.0},
        {"model": "vgg-cbv", "brain_age": 58.0, "age": 60.0}], provenance=provenance)
    text = generate_participant_report(tmp_path, "01", run_uuid="r").read_text(encoding="utf-8")
    section = _sections(text)["sub-01_ses-A_run-1"]
    start = section.index("<h3>Diffusion autoencoder (diffusion-ae)</h3>")
    dae = section[start:section.index("</figure>", start)]  # up to the end of its figure
    cells = dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", dae))
    assert cells["Brain age (mean of 3 fold network(s))"] == "61.0 years"
    assert cells["95% interval (Monte-Carlo dropout of the age MLP, 50 passes x 3 folds "
                 "pooled)"] == "[52.5, 70.2] years"
    assert cells["SD of the Monte-Carlo dropout passes"] == "3.46 years"
    assert cells["Axial slices predicted from (MNI z)"] == "22.7 mm (medial), 18.4 mm, 27.1 mm"
    assert cells["Reconstruction SSIM (fold 0, 100 DDIM steps)"] == "0.9123"
    assert cells["Reconstruction PSNR"] == "27.50 dB"
    assert cells["Held-out reconstructions in cross-validation (134 scans)"] == \
        "SSIM 0.9000 ± 0.0200, PSNR 26.00 ± 1.50 dB"
    # one figure of the three slices in a row, in the participant's figures folder
    (src,) = re.findall(r'<img src="([^"]+)"', dae)
    assert src.startswith("sub-01/figures/sub-01_ses-A_run-1_space-MNI152NLin2009aSym_"
                          "desc-diffusionae_reconslice.")
    assert (tmp_path / src).is_file()
    if src.endswith(".svg"):
        # three panels and the colour bar of the difference
        assert len(ET.parse(tmp_path / src).getroot().findall(".//{*}image")) == 4
    assert "input slice, reconstruction and difference" in dae
    # the provenance list names vgg-cbv's stack; diffusion-ae's numbers are in its own section
    assert "<li>vgg-cbv: branches T1w, stack T</li>" in section
    assert "diffusion-ae: branches" not in section


def test_failed_units_say_what_is_missing(report):
    _, _, text = report
    sections = _sections(text)
    run2 = sections["sub-01_ses-A_run-2"]
    assert "incomplete" in run2 and "did not complete" in run2
    assert "brain mask (sub-01_ses-A_run-2_desc-brain_mask.nii.gz)" in run2
    assert "preprocessed T1w (" not in run2  # it exists, so it is not listed as missing
    assert "skull-stripped input &amp; &lt;odd&gt; contrast" in run2
    assert "anisotropic" in run2
    assert "<img" not in run2  # no mask, no dseg, no template-space image: nothing to draw
    ses_b = sections["sub-01_ses-B"]
    assert "QC measures (sub-01_ses-B_qc.json)" in ses_b
    assert "1 of 3" in sections["summary"]


def test_methods_and_versions(report):
    _, _, text = report
    methods = _sections(text)["methods"]
    assert "<p>First paragraph about N4.</p>" in methods
    assert "<p>Second paragraph about registration.</p>" in methods
    assert f"<td>nibabel</td><td>{importlib.metadata.version('nibabel')}</td>" in methods
    assert "<td>model local-unet</td><td>sha256:0123</td>" in methods
    assert "20261122-abcd" in text


def test_unit_summary_matches_qc_json(tmp_path):
    write_unit(tmp_path, RUN1, qc=QC1, parts=())
    row = unit_summary(tmp_path, RUN1)
    assert row["unit"] == "sub-01_ses-A_run-1" and row["session"] == "A" and row["run"] == "1"
    for key in ("mask_volume_ml", "gm_volume_ml", "wm_volume_ml", "csf_volume_ml",
                "registration_similarity"):
        assert row[key] == QC1[key]
    assert row["registration_similarity_metric"] == "CC (higher is better)"
    assert row["flags"] == ["oblique"] and row["seconds"] == QC1["seconds"]
    assert row["complete"] is False and len(row["missing"]) == 8  # only the qc.json exists
    # Same row from a file name of the unit, and None for numbers the file lacks.
    write_unit(tmp_path, RUN2, qc={"gm_volume_ml": 1.5, "registration_similarity": float("nan")},
               parts=())
    row2 = unit_summary(tmp_path, tmp_path / "sub-01_ses-A_run-2_T1w.nii.gz")
    assert row2["gm_volume_ml"] == 1.5 and row2["mask_volume_ml"] is None
    assert row2["registration_similarity"] is None


def test_unreadable_qc_json_becomes_a_warning(tmp_path):
    write_unit(tmp_path, RUN1, qc={}, parts=())
    path = derivative_path(tmp_path, RUN1, suffix="qc", extension=".json")
    path.write_text("{not json", encoding="utf-8")
    row = unit_summary(tmp_path, RUN1)
    assert row["mask_volume_ml"] is None
    assert any("cannot read sub-01_ses-A_run-1_qc.json" in w for w in row["warnings"])


def test_scan_warnings_are_listed_with_the_image_warnings(tmp_path):
    # age problems live in scan_info (written by the participant level): the report shows them
    write_unit(tmp_path, RUN1, parts=(), qc={
        "warnings": ["oblique acquisition"],
        "scan_info": {"age": 6.0, "warnings": ["age 6.0 y is outside the ages densenet-clinical was "
                                               "trained on (20.17-81.94 y)", "oblique acquisition"]}})
    row = unit_summary(tmp_path, RUN1)
    assert row["warnings"] == ["oblique acquisition", "age 6.0 y is outside the ages densenet-clinical "
                               "was trained on (20.17-81.94 y)"]


def test_find_units_sorts_runs_numerically(tmp_path):
    for run in ("10", "2", "1"):
        write_unit(tmp_path, SourceEntities("02", run=run), qc={}, parts=())
    write_unit(tmp_path, SourceEntities("022"), qc={}, parts=())  # another subject
    assert [u.run for u in find_units(tmp_path, "02")] == ["1", "2", "10"]
    rows = summarize_units(tmp_path, "sub-02")
    assert [r["unit"] for r in rows] == ["sub-02_run-1", "sub-02_run-2", "sub-02_run-10"]


def test_report_without_any_derivative_still_lists_errors(tmp_path):
    path = generate_participant_report(tmp_path, "03", run_uuid="u1",
                                       errors=["T1w unreadable: not a NIfTI file"])
    text = path.read_text(encoding="utf-8")
    assert "No derivatives were found" in text and "T1w unreadable: not a NIfTI file" in text
    # Without a methods text, a default paragraph still names the software and template.
    methods = _sections(text)["methods"]
    assert f"generated with brainage {__version__}" in methods
    assert "MNI152NLin2009aSym" in methods


def test_arguments_are_validated(tmp_path):
    with pytest.raises(InputMissingError):
        generate_participant_report(tmp_path / "nope", "01", run_uuid="u")
    with pytest.raises(ValueError, match="subject"):
        generate_participant_report(tmp_path, "0-1", run_uuid="u")
    with pytest.raises(TypeError, match="errors"):
        generate_participant_report(tmp_path, "01", run_uuid="u", errors="one crash")
    with pytest.raises(ValueError, match="run_uuid"):
        generate_participant_report(tmp_path, "01", run_uuid=" ")
    with pytest.raises(ValueError, match="does not belong"):
        generate_participant_report(tmp_path, "01", run_uuid="u", units=[SourceEntities("02")])
    assert not list(tmp_path.iterdir())  # nothing written by a rejected call


def test_software_versions_and_packaged_template():
    versions = software_versions({"nilearn": "override"})
    assert versions["nipype"] == importlib.metadata.version("nipype")
    assert versions["nilearn"] == "override"
    assert set(versions) >= {"brainage", "ANTs (antspyx)", "nipype", "nibabel", "PyTorch",
                             "deepbet", "Python"}
    template = importlib.resources.files("bidsapp.reports") / "templates" / "participant.html"
    assert "$units" in template.read_text(encoding="utf-8")
    with pytest.raises(TypeError, match="extra_versions"):
        software_versions(["a"])
