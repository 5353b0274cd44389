"""Group level end to end on synthetic participant outputs with planted effects.

The outputs are written under the participant level's names: modulated GM maps with a
planted GM loss in group PT (a ball), brain masks, ``*_brainage.tsv`` rows with a planted
brain-PAD offset and an age bias, voxel brain-age maps with a planted regional offset,
relevance maps (seed 002 analyses) and a second session for four participants (ICC).

Relevance maps are dense in the half x >= 10 of the grid and sparse elsewhere (one-sample
test of |relevance|), rise with age in one ball (old vs young) and follow the age-free
part of brain-PAD in another (relevance ~ brain-PAD + age + age^2).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bidsapp.errors import InputMissingError, PhenotypeError, UsageError
from bidsapp.group import GroupOptions, GroupResult, run_group_level

SPACE = "MNI152NLin2009aSym"
SHAPE = (20, 24, 20)
# a 2 mm grid over the centre of MNI space (thalamus, striatum, hippocampi)
AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -30], [0, 0, 2.0, -14], [0, 0, 0, 1]])
CENTRE, RADIUS = np.array([6, 12, 10]), 3.0
MAP = f"space-{SPACE}_res-2_desc-{{}}_contrast-{{}}_stat-{{}}_statmap.nii.gz"
REL_AGE, REL_PAD = np.array([15, 6, 10]), np.array([15, 17, 10])   # relevance balls (radius 3)


def _distance(centre=CENTRE):
    return np.sqrt(np.sum((np.indices(SHAPE) - centre[:, None, None, None]) ** 2, axis=0))


def _noise(rng, sd):
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.5)
    return field / field.std() * sd


def make_dataset(root, *, n_per_group=12, n_repeat=4, seed=0, with_maps=True):
    """Write ``root/bids`` (phenotypes) and ``root/out`` (participant outputs)."""
    rng = np.random.default_rng(seed)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    out.mkdir(parents=True)
    n = 2 * n_per_group
    groups = np.array(["HC", "PT"] * n_per_group)
    ages = np.round(rng.uniform(25, 80, n), 1)
    sexes = np.array(["F", "M"])[rng.integers(0, 2, n)]
    rows = ["participant_id\tage\tsex\tgroup\tsurvival"]
    rows += [f"sub-{i:02d}\t{ages[i]}\t{sexes[i]}\t{groups[i]}\t{rng.uniform(10, 60):.1f}" for i in range(n)]
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    (bids / "participants.json").write_text(json.dumps({"age": {"Units": "years"}}))
    blob = _distance() <= RADIUS
    # relevance maps draw from a generator of their own: the other planted data stay as they were
    rel_rng = np.random.default_rng([seed, 2])
    dense = np.indices(SHAPE)[0] >= 10
    for i in range(n):
        sessions = ["A", "B"] if i < n_repeat else [None]
        gm = 0.5 + _noise(rng, 0.04) - (0.08 * blob if groups[i] == "PT" else 0)
        bias = 0.4 * (52.0 - ages[i])             # regression towards a training mean
        pad = bias + rng.normal(0, 2) + (6.0 if groups[i] == "PT" else 0)
        local = ages[i] + bias + _noise(rng, 2.0) + (6.0 * blob if groups[i] == "PT" else 0)
        if len(sessions) > 1:
            (bids / f"sub-{i:02d}").mkdir()
            (bids / f"sub-{i:02d}" / f"sub-{i:02d}_sessions.tsv").write_text(
                f"session_id\tage\nses-A\t{ages[i]}\nses-B\t{ages[i]}\n")
        for ses in sessions:
            prefix = f"sub-{i:02d}" + (f"_ses-{ses}" if ses else "")
            anat = out / f"sub-{i:02d}" / (f"ses-{ses}" if ses else "") / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            retest = _noise(rng, 0.01) if ses else 0.0
            if with_maps:
                sparse = np.where(rel_rng.random(SHAPE) < 0.05, rel_rng.normal(0, 2, SHAPE), 0.0)
                relevance = np.where(dense, _noise(rel_rng, 1.0), sparse) \
                    + 2.0 * (ages[i] - 52) / 15 * (_distance(REL_AGE) <= RADIUS) \
                    + 0.5 * (pad - bias) * (_distance(REL_PAD) <= RADIUS)
                nib.save(nib.Nifti1Image(relevance.astype(np.float32), AFFINE),
                         anat / f"{prefix}_space-{SPACE}_res-2_desc-mlens_relevancemap.nii.gz")
                nib.save(nib.Nifti1Image((gm + retest).astype(np.float32), AFFINE),
                         anat / f"{prefix}_space-{SPACE}_res-2_label-GM_desc-modulated_probseg.nii.gz")
                nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFFINE),
                         anat / f"{prefix}_space-{SPACE}_res-2_desc-brain_mask.nii.gz")
                nib.save(nib.Nifti1Image((local + 50 * retest).astype(np.float32), AFFINE),
                         anat / f"{prefix}_space-{SPACE}_res-2_desc-mlens_brainagemap.nii.gz")
            lines = ["model\tbrain_age\tbrain_age_lower\tbrain_age_upper\tage\tbrain_pad"]
            for model, extra in (("mlens", 0.0), ("beta", rng.normal(0, 2))):
                ba = ages[i] + pad + (rng.normal(0, 0.3) if ses else 0) + extra
                lines.append(f"{model}\t{ba:.3f}\tn/a\tn/a\t{ages[i]}\t{ba - ages[i]:.3f}")
            (anat / f"{prefix}_brainage.tsv").write_text("\n".join(lines) + "\n")
    return bids, out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("group"))


@pytest.fixture(scope="module")
def run(dataset):
    bids, out = dataset
    options = GroupOptions(n_perm=100, covariates=("age", "sex", "survival"))
    return run_group_level(bids, out, options, random_seed=1)


def _map(out, desc, contrast, stat):
    return np.asarray(nib.load(out / MAP.format(desc, contrast, stat)).dataobj)


def test_outputs_written_atomically(dataset, run):
    _, out = dataset
    assert isinstance(run, GroupResult)
    names = {p.name for p in run.files}
    for name in ("group_brainage.tsv", "group_brainage.json", "group_stats.tsv", "group_stats.json",
                 "group_roivolumes.tsv", "group.html", "desc-mlens_biasfit.json", "desc-beta_biasfit.json",
                 MAP.format("GMvolume", "HCVsPT", "pfwe"), MAP.format("mlens", "PTVsHC", "tfce")):
        assert name in names and (out / name).is_file()
    for stat in ("t", "d", "tfce", "p", "pfwe"):
        for desc in ("GMvolume", "mlens"):
            for contrast in ("PTVsHC", "HCVsPT"):
                assert (out / MAP.format(desc, contrast, stat)).is_file()
    assert not list(out.rglob("*.part"))
    stats = pd.read_csv(out / "group_stats.tsv", sep="\t")
    assert list(stats.columns) == ["model", "level", "region", "contrast", "test", "statistic", "df", "p",
                                   "p_corrected", "effect_size"]
    assert set(stats["level"]) == {"global", "roi", "voxel"}
    html = (out / "group.html").read_text()
    assert "Methods" in html and "Welch" in html and "randomise" in html
    for src in pd.Series(html.split('src="')[1:]).str.split('"').str[0]:
        assert (out / src).is_file()


def test_every_test_name_is_documented(dataset, run):
    _, out = dataset
    stats = pd.read_csv(out / "group_stats.tsv", sep="\t")
    documented = json.loads((out / "group_stats.json").read_text())["test"]["Levels"]
    assert set(stats["test"]) <= set(documented)
    assert len(set(stats["test"])) >= 15


def test_vbm_detects_the_planted_atrophy_only_where_planted(dataset, run):
    _, out = dataset
    dist = _distance()
    p_loss = _map(out, "GMvolume", "HCVsPT", "pfwe")        # HC > PT: GM loss in PT
    assert np.mean(p_loss[dist <= RADIUS - 1] <= 0.05) == 1.0
    assert not np.any(p_loss[dist >= RADIUS + 4] <= 0.05)
    assert not np.any(_map(out, "GMvolume", "PTVsHC", "pfwe") <= 0.05)
    d = _map(out, "GMvolume", "HCVsPT", "d")
    assert np.median(d[dist <= RADIUS - 1]) > 1.0 and abs(np.median(d[dist >= RADIUS + 4])) < 0.3
    assert run.summary["significant_voxels"]["GMvolume:HC>PT"] > 30
    assert run.summary["significant_voxels"]["GMvolume:PT>HC"] == 0


def test_voxel_brain_pad_detects_the_planted_region(dataset, run):
    _, out = dataset
    dist = _distance()
    p_old = _map(out, "mlens", "PTVsHC", "pfwe")
    assert np.mean(p_old[dist <= RADIUS - 1] <= 0.05) == 1.0
    assert not np.any(p_old[dist >= RADIUS + 4] <= 0.05)
    stats = pd.read_csv(out / "group_stats.tsv", sep="\t")
    pooled = stats[(stats.test == "welch_t_pooled_voxels") & (stats.model == "mlens")].iloc[0]
    assert pooled["statistic"] > 0 and pooled["df"] > 1000


def test_relevance_map_analyses_of_seed_002(dataset, run):
    """|relevance| where dense, old > young in the age ball, PAD slope in the PAD ball only."""
    _, out = dataset
    x, d_age, d_pad = np.indices(SHAPE)[0], _distance(REL_AGE), _distance(REL_PAD)
    p_abs = _map(out, "mlensabsrelevance", "MeanVsZero", "pfwe")
    assert np.all(p_abs[x >= 12] <= 0.05) and not np.any(p_abs[x <= 7] <= 0.05)
    p_old = _map(out, "mlensrelevanceagegroup", "OldVsYoung", "pfwe")
    assert np.all(p_old[d_age <= 2] <= 0.05) and not np.any(p_old[d_age >= 7] <= 0.05)
    assert not np.any(_map(out, "mlensrelevanceagegroup", "YoungVsOld", "pfwe") <= 0.05)
    p_pad = _map(out, "mlensrelevancepad", "PADVsZero", "pfwe")
    assert np.all(p_pad[d_pad <= 2] <= 0.05)
    assert not np.any(p_pad[d_age <= RADIUS + 1] <= 0.05)          # age, not brain-PAD
    assert not np.any(p_pad[d_pad >= 7] <= 0.05)
    assert not np.any(_map(out, "mlensrelevancepad", "ZeroVsPAD", "pfwe") <= 0.05)
    assert np.median(_map(out, "mlensrelevancepad", "PADVsZero", "r")[d_pad <= 2]) > 0.5
    for desc, contrast, stat in (("mlensabsrelevance", "MeanVsZero", "d"), ("mlensrelevanceagegroup",
                                 "YoungVsOld", "tfce"), ("mlensrelevancepad", "ZeroVsPAD", "t")):
        assert (out / MAP.format(desc, contrast, stat)).is_file()
    meta = json.loads((out / MAP.format("mlensrelevancepad", "PADVsZero", "t").replace(".nii.gz", ".json"))
                      .read_text())
    assert meta["Regressor"] == "bias-corrected brain-PAD of mlens (linear-age)"
    assert meta["Covariates"] == ["age", "age^2"] and meta["NPermutations"] == 100 and meta["N"] == 24
    meta = json.loads((out / MAP.format("mlensrelevanceagegroup", "OldVsYoung", "d").replace(".nii.gz", ".json"))
                      .read_text())
    assert (meta["NOld"], meta["NYoung"]) == (11, 8)                # ages <= 40 and >= 60 of the fixture
    stats = pd.read_csv(out / "group_stats.tsv", sep="\t").set_index(["test", "contrast"])
    rel = stats[stats.model == "mlensrelevance"]
    for test, contrast, df in (("permutation_onesample_abs_tfce_fwe", "Mean-Zero", 23),
                               ("permutation_agegroup_tfce_fwe", "Old-Young", 17),
                               ("permutation_pad_glm_tfce_fwe", "PAD-Zero", 20)):
        row = rel.loc[(test, contrast)]
        assert row["p"] <= 0.05 and row["p_corrected"] <= 0.05 and row["df"] == df and row["statistic"] > 0
    assert rel.loc[("permutation_pad_glm_tfce_fwe", "Zero-PAD"), "p_corrected"] > 0.05
    assert run.summary["significant_voxels"]["mlensrelevance:Old>Young"] > 30
    assert run.summary["significant_voxels"]["mlensrelevance:PADslope<0"] == 0
    html = (out / "group.html").read_text()
    assert "Relevance maps" in html and "group_desc-mlensrelevancepad_contrast-PADVsZero_stat-r" in html


def test_global_brain_pad_statistics(dataset, run):
    _, out = dataset
    stats = pd.read_csv(out / "group_stats.tsv", sep="\t", keep_default_na=False, na_values=["n/a"])
    glob = stats[(stats.level == "global") & (stats.model == "mlens")].set_index("test")
    assert glob.loc["welch_t", "contrast"] == "PT-HC"
    assert glob.loc["welch_t", "p"] < 0.01 and glob.loc["welch_t", "effect_size"] > 1
    assert glob.loc["ztest_2samp", "p"] < 0.01 and glob.loc["ks_2samp", "p"] < 0.05
    assert glob.loc["welch_anova", "p"] == pytest.approx(glob.loc["welch_t", "p"], rel=1e-6)
    corr = stats[(stats.model == "mlens") & stats.test.str.startswith("pearson_pad_age")]
    before = corr[(corr.test == "pearson_pad_age_before") & (corr.region == "controls")]["statistic"]
    after = corr[(corr.test == "pearson_pad_age_after") & (corr.region == "controls")]["statistic"]
    assert before.iloc[0] < -0.8 and abs(after.iloc[0]) < 1e-10
    fit = json.loads((out / "desc-mlens_biasfit.json").read_text())
    assert fit["global"]["method"] == "linear-age" and fit["global"]["n_fit"] == 12   # one scan each
    assert fit["global"]["slope"] == pytest.approx(-0.4, abs=0.15)
    table = pd.read_csv(out / "group_brainage.tsv", sep="\t")
    assert len(table) == 2 * 28 and set(table["model"]) == {"mlens", "beta"}
    assert list(table.columns[:9]) == ["participant_id", "session_id", "scan", "model", "brain_age", "age",
                                       "brain_pad", "brain_pad_corrected", "group"]
    assert {"sex", "survival"} <= set(table.columns)
    assert set(stats.loc[stats.test == "pearson_pad_covariate", "region"]) == {"age", "survival"}
    assert (stats.test == "pearson_sliding_window").any()
    assert (stats.test == "ks_2samp_models").sum() == 1


def test_roi_tables_and_reliability(dataset, run):
    _, out = dataset
    stats = pd.read_csv(out / "group_stats.tsv", sep="\t")
    roi = stats[(stats.test == "welch_t_gm_volume")]
    assert len(roi) > 10 and roi["p_corrected"].ge(roi["p"]).all()
    vols = pd.read_csv(out / "group_roivolumes.tsv", sep="\t")
    assert len(vols) == 28 and (vols.drop(columns=["participant_id", "session_id"]) >= 0).all().all()
    icc = stats[(stats.test == "icc_2_1") & (stats.level == "voxel")].set_index("model")["statistic"]
    assert icc["GMvolume"] > 0.8
    assert (stats.test == "pearson_pad_volume").any() and (stats.test == "welch_t_roi_brain_pad").any()
    assert (out / f"space-{SPACE}_res-2_desc-GMvolume_stat-icc_statmap.nii.gz").is_file()


def test_unknown_columns_and_labels_list_what_exists(dataset, tmp_path):
    bids, out = dataset
    with pytest.raises(PhenotypeError, match=r"columns present: \['age', 'group', 'sex', 'survival'\]"):
        run_group_level(bids, out, GroupOptions(group_column="diagnosis", n_perm=10))
    with pytest.raises(PhenotypeError, match=r"labels present: \['HC', 'PT'\]"):
        run_group_level(bids, out, GroupOptions(control_label="CN", n_perm=10))
    with pytest.raises(PhenotypeError, match="labels present"):
        run_group_level(bids, out, GroupOptions(contrasts=("AD-HC",), n_perm=10))
    with pytest.raises(PhenotypeError, match="covariate"):
        run_group_level(bids, out, GroupOptions(covariates=("bmi",), n_perm=10))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputMissingError, match="participant level first"):
        run_group_level(bids, empty, GroupOptions())


def test_stored_bias_fit_is_reused(dataset, run, tmp_path):
    """--bias-fit-on FILE: another site's coefficients, not this run's controls."""
    _, out = dataset
    stored = json.loads((out / "desc-mlens_biasfit.json").read_text())["global"]
    bids2, out2 = make_dataset(tmp_path, seed=5, with_maps=False)
    res = run_group_level(bids2, out2, GroupOptions(bias_fit_on=str(out / "desc-mlens_biasfit.json"),
                                                    n_perm=10), random_seed=0)
    assert not any(p.name.endswith("_statmap.nii.gz") for p in res.files)
    fit = json.loads((out2 / "desc-mlens_biasfit.json").read_text())
    assert fit["global"] == stored                      # reused as is
    assert json.loads((out2 / "desc-beta_biasfit.json").read_text())["fitted_on"] == "controls"
    table = pd.read_csv(out2 / "group_brainage.tsv", sep="\t")
    mlens = table[table.model == "mlens"]
    expected = mlens.brain_pad - (stored["slope"] * mlens.age + stored["intercept"])
    np.testing.assert_allclose(mlens.brain_pad_corrected, expected, atol=1e-6)


def test_options_validation_and_json(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps({"group_column": "dx", "covariates": ["age"], "n-perm": 10, "tfce": False}))
    opts = GroupOptions.from_json(path)
    assert (opts.group_column, opts.covariates, opts.n_perm, opts.tfce) == ("dx", ("age",), 10, False)
    path.write_text(json.dumps({"n_permutations": 10}))
    with pytest.raises(UsageError, match="n_permutations"):
        GroupOptions.from_json(path)
    with pytest.raises(UsageError, match="bias_correction"):
        GroupOptions(bias_correction="quadratic")
    with pytest.raises(UsageError, match="n_perm"):
        GroupOptions(n_perm=0)
    with pytest.raises(UsageError, match="connectivity"):
        GroupOptions(connectivity=8)
