"""Age lookup: units, order of tables, censoring and refusals."""

import json

import pytest

from bidsapp.bids import collect_t1w_units, lookup_scan_info, to_years
from bidsapp.errors import AgeError


@pytest.mark.parametrize("value, unit, expected", [
    ("23", "months", 23 / 12), ("6 years", None, 6.0), (" 6 ", "years", 6.0),
    ("10", "weeks", 70 / 365.25), ("365.25", "days", 1.0), ("n/a", "years", None), (41, None, 41.0),
])
def test_to_years_converts_units(value, unit, expected):
    years, censored = to_years(value, unit, where="t")
    assert censored is False
    assert years == pytest.approx(expected) if expected is not None else years is None


def test_censored_89_plus():
    assert to_years("89+", "year", where="t") == (89.0, True)


@pytest.mark.parametrize("value, unit, match", [
    ("forty", "years", "not a number"), ("-3", "years", "negative"),
    ("30", "gestational_weeks", "cannot be converted"), ("6 years", "months", "contradicts"),
    ("70+", None, "89"), ("300", None, "implausible"),
])
def test_to_years_refuses(value, unit, match):
    with pytest.raises(AgeError, match=match):
        to_years(value, unit, where="participants.tsv")


def test_lookup_order_and_units(tiny_bids):
    units = {u.relpath: u.info for u in collect_t1w_units(tiny_bids)}
    assert units["sub-01/anat/sub-01_T1w.nii.gz"].age == pytest.approx(34.5)
    assert units["sub-01/anat/sub-01_T1w.nii.gz"].sex == "F"
    # sessions.tsv (months) wins over participants.tsv for ses-A ...
    ses_a = units["sub-02/ses-A/anat/sub-02_ses-A_T1w.nii.gz"]
    assert ses_a.age == pytest.approx(2.5) and ses_a.age_source == "sub-02/sub-02_sessions.tsv"
    # ... and n/a there falls back to participants.tsv, which is censored.
    ses_b = units["sub-02/ses-B/anat/sub-02_ses-B_T1w.nii.gz"]
    assert (ses_b.age, ses_b.age_censored, ses_b.age_source) == (89.0, True, "participants.tsv")


def test_scans_tsv_takes_precedence_with_sidecar_units(tiny_bids):
    ses = tiny_bids / "sub-02" / "ses-A"
    (ses / "sub-02_ses-A_scans.tsv").write_text("filename\tage\nanat/sub-02_ses-A_T1w.nii.gz\t100\n")
    (ses / "sub-02_ses-A_scans.json").write_text(json.dumps({"age": {"Units": "weeks"}}))
    info = lookup_scan_info(tiny_bids, ses / "anat" / "sub-02_ses-A_T1w.nii.gz", "02", "A")
    assert info.age == pytest.approx(700 / 365.25)


def test_missing_age_warns(tiny_bids):
    (tiny_bids / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\nsub-02\tM\n")
    info = lookup_scan_info(tiny_bids, tiny_bids / "sub-01/anat/sub-01_T1w.nii.gz", "01")
    assert info.age is None and any("no age" in w for w in info.warnings)


def test_pediatric_ages(pediatric_dir):
    """Real tables with units of their own: months, years, a scans.tsv naming another file."""
    infos = {u.source.prefix: u.info for u in collect_t1w_units(pediatric_dir)}
    assert infos["sub-0002_ses-V01"].age == pytest.approx(23 / 12)
    assert infos["sub-0008_ses-V01"].age == pytest.approx(1 / 12)
    assert infos["sub-0001_ses-V01"].age == pytest.approx(6.0)
    assert infos["sub-0001_ses-V02"].age_source == "sub-0001/sub-0001_sessions.tsv"
    # sub-0003's scans.tsv lists sub-0002's file: never borrowed, age unknown with a warning.
    assert infos["sub-0003_ses-V01"].age is None
    assert any("has no row" in w for w in infos["sub-0003_ses-V01"].warnings)
