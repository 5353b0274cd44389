"""The group level on brain-age tables with diffusion-ae rows (seed 001): its brain-PADs get the
paper's two-sample KS tests against every other model's (``ks_2samp_models``, seed 001 Table 2)
and the PAD-covariate correlations (survival in the paper) like any other model.

The participant outputs are ``*_brainage.tsv`` tables only (no maps), written under the
participant level's names with :func:`bidsapp.derivatives.write_brainage_table`, as in
``tests/test_group.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bidsapp.derivatives import SourceEntities, derivative_path, write_brainage_table
from bidsapp.group import GroupOptions, run_group_level


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("group-dae")
    bids, out = root / "bids", root / "out"
    bids.mkdir()
    rng = np.random.default_rng(11)
    n = 24
    groups = np.array(["HC", "PT"] * (n // 2))
    ages = np.round(rng.uniform(30, 80, n), 1)
    survival = np.round(rng.uniform(10, 60, n), 1)
    rows = ["participant_id\tage\tgroup\tsurvival"]
    rows += [f"sub-{i:02d}\t{ages[i]}\t{groups[i]}\t{survival[i]}" for i in range(n)]
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    (bids / "participants.json").write_text(json.dumps({"age": {"Units": "years"}}))
    for i in range(n):
        patient = groups[i] == "PT"
        # diffusion-ae: PADs spread wider than mlens' and tied to survival in the patients (the
        # paper's finding); mlens: a narrow PAD, unrelated to survival
        dae = ages[i] + rng.normal(0, 9) + (0.3 * (35 - survival[i]) if patient else 0.0)
        mlens = ages[i] + rng.normal(0, 2)
        table = [{"model": "diffusion-ae", "brain_age": dae, "brain_age_lower": dae - 10,
                  "brain_age_upper": dae + 10, "age": float(ages[i])},
                 {"model": "mlens", "brain_age": mlens, "age": float(ages[i])},
                 {"model": "ensemble", "brain_age": (dae + mlens) / 2, "age": float(ages[i])}]
        write_brainage_table(derivative_path(out, SourceEntities(f"{i:02d}"), suffix="brainage",
                                             extension=".tsv"), table)
    options = GroupOptions(n_perm=10, covariates=("age", "survival"))
    run_group_level(bids, out, options, random_seed=0)
    stats = pd.read_csv(out / "group_stats.tsv", sep="\t", keep_default_na=False,
                        na_values=["n/a"])
    return out, stats


def test_ks_tests_between_diffusion_ae_and_the_other_models(group_run):
    _, stats = group_run
    ks = stats[stats.test == "ks_2samp_models"].set_index("model")
    assert set(ks.index) == {"diffusion-ae vs ensemble", "diffusion-ae vs mlens",
                             "ensemble vs mlens"}
    row = ks.loc["diffusion-ae vs mlens"]
    assert row["level"] == "global" and 0 < row["statistic"] <= 1 and 0 < row["p"] <= 1
    # the planted wider spread of the diffusion-ae PADs is found
    assert row["p"] < 0.05


def test_pad_covariate_correlations_of_diffusion_ae(group_run):
    out, stats = group_run
    corr = stats[(stats.test == "pearson_pad_covariate") & (stats.model == "diffusion-ae")]
    assert set(corr["region"]) == {"age", "survival"}
    survival = corr.set_index("region").loc["survival"]
    assert -1 <= survival["statistic"] <= 1 and survival["df"] == 24 - 2
    assert survival["p_corrected"] >= survival["p"]
    # the per-model statistics, bias fit and table rows of any model
    glob = stats[(stats.model == "diffusion-ae") & (stats.level == "global")]
    assert {"welch_t", "ks_2samp", "pearson_pad_age_before"} <= set(glob.test)
    assert (out / "desc-diffusionae_biasfit.json").is_file()
    table = pd.read_csv(out / "group_brainage.tsv", sep="\t")
    assert (table.model == "diffusion-ae").sum() == 24
    assert "diffusion-ae" in (out / "group.html").read_text()
