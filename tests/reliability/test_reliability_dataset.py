"""Reliability: the dataset, labels and output locations (all refused before any processing).

Already covered in tests/cli/test_exit_codes.py and not repeated here: missing bids_dir (66),
unknown participant label (18), filter matching nothing (18), ``--participant-label ../01`` (64),
output_dir equal to / inside bids_dir (64), output_dir below a regular file (73).
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
from reliability_cases import (T1W, assert_nothing_written, blob_t1w, make_dataset, one_error_line,
                               run_brainage, skip_unless_permissions_enforced, write_image)


def test_bids_dir_is_a_file_is_66(tmp_path, capsys):
    bids = tmp_path / "ds.zip"
    bids.write_bytes(b"PK")
    code, err = run_brainage(capsys, bids, tmp_path / "out")
    line = one_error_line(err)
    assert code == 66 and "ds.zip" in line and "not a directory" in line
    assert not (tmp_path / "out").exists()


def test_not_a_bids_dataset_is_66(dataset, tmp_path, capsys):
    (dataset / "dataset_description.json").unlink()
    code, err = run_brainage(capsys, dataset, tmp_path / "out")
    line = one_error_line(err)
    assert code == 66 and "dataset_description.json" in line and "dataset root" in line
    assert_nothing_written(tmp_path / "out")


@pytest.mark.skipif(shutil.which("bids-validator-deno") is None, reason="bids-validator-deno not installed")
def test_not_a_bids_dataset_with_validation_is_16(dataset, tmp_path, capsys):
    (dataset / "dataset_description.json").unlink()
    code, err = run_brainage(capsys, dataset, tmp_path / "out", validate=True)
    line = one_error_line(err)
    assert code == 16 and "MISSING_DATASET_DESCRIPTION" in line and "--skip-bids-validation" in line
    assert_nothing_written(tmp_path / "out")


def test_dataset_without_any_t1w_is_66(dataset, tmp_path, capsys):
    t1w = dataset / T1W
    t1w.rename(t1w.with_name("sub-01_T2w.nii.gz"))
    code, err = run_brainage(capsys, dataset, tmp_path / "out")
    line = one_error_line(err)
    assert code == 66 and "has no T1w image" in line and "anat/sub-<label>" in line
    assert_nothing_written(tmp_path / "out")


def test_requested_participant_without_t1w_is_66(dataset, tmp_path, capsys):
    write_image(dataset / "sub-02" / "anat" / "sub-02_T2w.nii.gz", blob_t1w())
    code, err = run_brainage(capsys, dataset, tmp_path / "out", "--participant-label", "02")
    line = one_error_line(err)
    assert code == 66 and "no T1w image for sub-02" in line
    assert_nothing_written(tmp_path / "out")


def test_session_label_excluding_every_t1w_is_18(dataset, tmp_path, capsys):
    # T1w images exist, the selection excludes them all: an empty selection, not missing input
    code, err = run_brainage(capsys, dataset, tmp_path / "out", "--session-label", "B")
    line = one_error_line(err)
    assert code == 18 and "'session': ['B']" in line and "--session-label" in line
    assert_nothing_written(tmp_path / "out")


@pytest.mark.skipif(shutil.which("bids-validator-deno") is None, reason="bids-validator-deno not installed")
def test_empty_participants_tsv_fails_validation_16(tmp_path, capsys):
    bids = make_dataset(tmp_path / "ds", participants="participant_id\tage\n")
    code, err = run_brainage(capsys, bids, tmp_path / "out", validate=True)
    line = one_error_line(err)
    assert code == 16 and "PARTICIPANT_ID_MISMATCH" in line and "participants.tsv" in line
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("content", ["", "participant_id\tage\n"], ids=["zero-bytes", "header-only"])
def test_empty_participants_tsv_without_validation_reads_no_age(tmp_path, content):
    """Without the validator the participant level runs: the age is unknown, and it says so."""
    from bidsapp.bids import collect_t1w_units

    bids = make_dataset(tmp_path / "ds", participants=content)
    [unit] = collect_t1w_units(bids)
    assert unit.info.age is None and any("no age found" in w for w in unit.info.warnings)


def test_participants_json_not_json_is_65(tmp_path, capsys):
    bids = make_dataset(tmp_path / "ds")
    (bids / "participants.json").write_text('{"age": {"Units": "year"}')
    code, err = run_brainage(capsys, bids, tmp_path / "out")
    line = one_error_line(err)
    assert code == 65 and "participants.json" in line and "not valid JSON" in line
    assert_nothing_written(tmp_path / "out")


def test_dangling_symlink_t1w_is_66_and_suggests_datalad_get(dataset, tmp_path, capsys):
    t1w = dataset / T1W
    t1w.unlink()
    t1w.symlink_to("../../.git/annex/objects/XX/SHA256E-s1--0.nii.gz")
    code, err = run_brainage(capsys, dataset, tmp_path / "out")
    line = one_error_line(err)
    assert code == 66 and "sub-01_T1w.nii.gz" in line and "datalad get" in line
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("option, label", [("--participant-label", "01/anat"),
                                           ("--participant-label", "sub-01/../02"),
                                           ("--session-label", "../A")])
def test_label_with_path_separator_is_64(dataset, tmp_path, capsys, option, label):
    code, err = run_brainage(capsys, dataset, tmp_path / "out", option, label)
    line = one_error_line(err)
    assert code == 64 and repr(label) in line and "letters and digits" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside, message", [("bids", "is inside bids_dir; use a scratch directory"),
                                             ("output", "is inside output_dir; use a separate directory")])
def test_work_dir_inside_bids_or_output_dir_is_64(dataset, tmp_path, capsys, inside, message):
    out = tmp_path / "out"
    work = (dataset if inside == "bids" else out) / "work"
    code, err = run_brainage(capsys, dataset, out, work=work)
    line = one_error_line(err)
    assert code == 64 and f"--work-dir {work} {message}" in line
    assert not work.exists() and not out.exists()


@pytest.mark.parametrize("which", ["output", "work"])
def test_read_only_output_or_work_dir_is_73(dataset, tmp_path, capsys, which):
    skip_unless_permissions_enforced(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    locked = out if which == "output" else work
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = run_brainage(capsys, dataset, out, work=work)
    finally:
        locked.chmod(0o755)
    line = one_error_line(err)
    assert code == 73 and str(locked) in line and "not writable" in line and "Permission denied" in line
    assert list(locked.iterdir()) == []


def _full_disk(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_is_73_and_leaves_no_partial_file(dataset, tmp_path, capsys, monkeypatch):
    """ENOSPC where a full disk reports it (on flush/fsync of a written file): one line naming
    the file, exit 73, and neither the file nor its temporary ``.part`` remains."""
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", _full_disk)
    out = tmp_path / "out"
    code, err = run_brainage(capsys, dataset, out)
    monkeypatch.setattr(os, "fsync", real_fsync)
    line = one_error_line(err)
    assert code == 73 and "No space left on device" in line and "free disk space" in line
    assert "logs/config-" in line and "nothing is left half-written" in line
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_disk_full_keeps_the_previous_version_of_a_file(tmp_path, monkeypatch):
    """A derivative rewritten on a full disk keeps its previous complete content."""
    from bidsapp.derivatives import write_json
    from bidsapp.errors import NotWritableError

    target = write_json(tmp_path / "anat" / "sub-01_qc.json", {"run": 1})
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(NotWritableError, match=r"sub-01_qc\.json could not be written \(No space"):
        write_json(target, {"run": 2})
    assert json.loads(target.read_text()) == {"run": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["sub-01_qc.json"]
