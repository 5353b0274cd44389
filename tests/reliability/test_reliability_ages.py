"""Reliability: ages in participants.tsv that cannot be read without guessing (exit 65, before
any processing, naming the file and column).

The conversions themselves are tested in tests/bids/test_ages.py; ages that *can* be read
(``89+``, months with ``Units``, no age at all) are run end to end in
test_reliability_real_runs.py.
"""

from __future__ import annotations

import pytest
from reliability_cases import assert_nothing_written, make_dataset, one_error_line, run_brainage


@pytest.mark.parametrize("age, sidecar, message", [
    ("forty", None, "age 'forty' is not a number"),
    ("-3", None, "age '-3' is negative"),
    # months written into a bare 'age' column (BIDS: years) with no Units: 420 y is refused
    ("420", None, "age '420' (420.0 y) is implausible; check the units"),
    ("42", {"age": {"Units": "decades"}}, "age unit 'decades' cannot be converted to years"),
    ("70+", None, "only '89+' is a recognised censored age"),
    ("6 years", {"age": {"Units": "months"}}, "contradicts the sidecar unit 'months'"),
    ("89+", {"age": {"Units": "months"}}, "is the censored age in years, but the unit here is 'months'"),
], ids=["non-numeric", "negative", "months-without-units", "unknown-unit", "censored-not-89",
        "inline-unit-contradicts-sidecar", "censored-in-months"])
def test_unreadable_age_is_65(tmp_path, capsys, age, sidecar, message):
    bids = make_dataset(tmp_path / "ds", participants=f"participant_id\tage\nsub-01\t{age}\n",
                        participants_json=sidecar)
    code, err = run_brainage(capsys, bids, tmp_path / "out")
    line = one_error_line(err)
    assert code == 65 and "participants.tsv (column 'age')" in line and message in line
    assert_nothing_written(tmp_path / "out")


def test_unreadable_age_in_sessions_tsv_names_that_file(tmp_path, capsys):
    bids = make_dataset(tmp_path / "ds")
    (bids / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage_months\nses-A\ttwo\n")
    t1w = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    (bids / "sub-01" / "ses-A" / "anat").mkdir(parents=True)
    t1w.rename(bids / "sub-01" / "ses-A" / "anat" / "sub-01_ses-A_T1w.nii.gz")
    code, err = run_brainage(capsys, bids, tmp_path / "out")
    line = one_error_line(err)
    assert code == 65 and "sub-01/sub-01_sessions.tsv (column 'age_months')" in line and "'two'" in line
    assert_nothing_written(tmp_path / "out")
