"""Group level of the vgg-cbv Grad-CAM maps (seed 003, Fig. 4): mean map per 10-year age group,
one scan per participant, no permutation analysis (those stay with mlens and densenet-clinical)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bidsapp.group import GroupOptions, run_group_level

SPACE = "MNI152NLin2009aSym"
SHAPE = (20, 24, 20)
AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -30], [0, 0, 2.0, -14], [0, 0, 0, 1]])
AGES = {"01": 23.0, "02": 27.5, "03": 34.0, "04": 38.9, "05": 41.0, "06": 45.5, "07": 52.0,
        "08": None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Grad-CAM maps (sparse, non-negative) and MNI-space T1w images of 8 participants, sub-02
    with two sessions (ses-B is not the participant's primary scan), sub-08 without an age; and
    mlens relevance maps of the same scans."""
    root = tmp_path_factory.mktemp("gradcam")
    bids, out = root / "bids", root / "out"
    bids.mkdir()
    rng = np.random.default_rng(5)
    rows = ["participant_id\tage\tsex\tgroup"]
    maps, t1ws = {}, {}
    for i, (label, age) in enumerate(AGES.items()):
        rows.append(f"sub-{label}\t{'n/a' if age is None else age}\t{'FM'[i % 2]}\t{'HC' if i % 2 else 'PT'}")
        for ses in (["A", "B"] if label == "02" else [None]):
            prefix = f"sub-{label}" + (f"_ses-{ses}" if ses else "")
            anat = out / f"sub-{label}" / (f"ses-{ses}" if ses else "") / "anat"
            anat.mkdir(parents=True)
            cam = np.where(rng.random(SHAPE) < 0.2, rng.uniform(0.1, 1.0, SHAPE), 0.0).astype(np.float32)
            t1w = (rng.uniform(200, 1000, SHAPE) * (rng.random(SHAPE) < 0.9)).astype(np.float32)
            nib.save(nib.Nifti1Image(cam, AFFINE),
                     anat / f"{prefix}_space-{SPACE}_res-2_desc-vggcbv_relevancemap.nii.gz")
            nib.save(nib.Nifti1Image(rng.normal(0, 1, SHAPE).astype(np.float32), AFFINE),
                     anat / f"{prefix}_space-{SPACE}_res-2_desc-mlens_relevancemap.nii.gz")
            nib.save(nib.Nifti1Image(t1w, AFFINE),
                     anat / f"{prefix}_space-{SPACE}_res-2_desc-preproc_T1w.nii.gz")
            maps[prefix], t1ws[prefix] = cam, t1w
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    (bids / "participants.json").write_text(json.dumps({"age": {"Units": "years"}}))
    (bids / "sub-02").mkdir()
    (bids / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-A\t27.5\nses-B\t28.0\n")
    result = run_group_level(bids, out, GroupOptions(n_perm=10, tfce=False), random_seed=0)
    return out, maps, t1ws, result


def test_mean_map_per_ten_year_age_group_equals_the_numpy_mean(dataset):
    out, maps, _, result = dataset
    expected = {"20to29": ["sub-01", "sub-02_ses-A"], "30to39": ["sub-03", "sub-04"],
                "40to49": ["sub-05", "sub-06"], "50to59": ["sub-07"]}
    written = sorted(p.name for p in out.glob("space-*_desc-vggcbvage*_relevancemap.nii.gz"))
    assert written == [f"space-{SPACE}_res-2_desc-vggcbvage{g}_relevancemap.nii.gz" for g in expected]
    for group, scans in expected.items():
        path = out / f"space-{SPACE}_res-2_desc-vggcbvage{group}_relevancemap.nii.gz"
        img = nib.load(path)
        np.testing.assert_allclose(img.affine, AFFINE)
        np.testing.assert_allclose(img.get_fdata(), np.mean([maps[s] for s in scans], axis=0),
                                   rtol=1e-6, atol=1e-7)
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        low = int(group[:2])
        assert meta["AgeGroup"] == [low, low + 10] and meta["N"] == len(scans)
        assert meta["Scans"] == scans
        assert meta["MeanAge"] == pytest.approx(np.mean([AGES[s[4:6]] for s in scans]))
        assert path in result.files


def test_no_permutation_analysis_of_gradcam_maps_but_of_mlens_maps(dataset):
    out, _, _, _ = dataset
    statmaps = [p.name for p in out.glob("*_statmap.nii.gz")]
    assert not [name for name in statmaps if "vggcbv" in name]
    assert f"space-{SPACE}_res-2_desc-mlensabsrelevance_contrast-MeanVsZero_stat-t_statmap.nii.gz" in statmaps
    stats = (out / "group_stats.tsv").read_text()
    assert "vggcbv" not in stats and "mlensrelevance" in stats


def test_group_report_draws_the_age_groups_over_the_mean_t1w(dataset):
    out = dataset[0]
    html = (out / "group.html").read_text()
    assert "Grad-CAM by age group" in html
    figure = out / "figures" / "group_desc-vggcbv_gradcamagegroups.svg"
    if not figure.is_file():
        figure = figure.with_suffix(".png")
    assert figure.is_file() and figure.relative_to(out).as_posix() in html
    for name in ("vggcbvage20to29", "vggcbvage50to59"):
        assert name in html


def test_mean_t1w_normalises_each_scan_by_its_top_percent(dataset):
    from types import SimpleNamespace

    import pandas as pd

    from bidsapp.group import _mean_t1w
    from bidsapp.transforms.mni_affine import top_fraction_mean

    out, _, t1ws, _ = dataset
    scans = ["sub-03", "sub-04"]
    paths = [next(out.rglob(f"{s}_space-{SPACE}_res-2_desc-preproc_T1w.nii.gz")) for s in scans]
    # the report's background: the scans' T1w images, a scan without one is left out
    ctx = SimpleNamespace(scans=pd.DataFrame({"std_t1w": paths + [None]}))
    got = _mean_t1w(ctx, np.array([0, 1, 2]), SHAPE, AFFINE)
    expected = np.mean([t1ws[s] / top_fraction_mean(t1ws[s][t1ws[s] > 0], 0.01) for s in scans], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert _mean_t1w(ctx, np.array([0]), (4, 4, 4), AFFINE) is None  # another grid: no background
