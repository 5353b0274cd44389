"""SIGTERM (scancel, a batch time limit, docker stop) or SIGINT (Ctrl-C) during a participant run:
exit 130 at once; a rerun then resumes and completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _interruptible() -> None:
    """Child processes get SIGINT's default action, as in a terminal.

    A shell starts background jobs (``cmd &``, nohup, many CI runners) with SIGINT ignored, the
    children inherit that, and brainage (like Python itself) keeps an inherited SIG_IGN.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_serial_run_stops_it_with_130(tiny_bids, tmp_path, signum):
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(REPO / "bin" / "brainage"), str(tiny_bids), str(tmp_path / "out"),
                             "participant", "-w", str(work), "--nprocs", "1", "--omp-nthreads", "1",
                             "--models", "none", "--skip-bids-validation"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)
    deadline = time.monotonic() + 300
    while not any(work.rglob("_report")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the first nipype node runs
    assert proc.poll() is None, "the run ended before it could be signalled"
    before = {p.parent for p in work.rglob("_report")}
    os.kill(proc.pid, signum)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    # nipype logs the node it was running as failed; brainage's last word is the interruption
    assert "interrupted: finished files are kept" in err.strip().splitlines()[-1]
    assert time.monotonic() - signalled < 60, "the run went on with other nodes after the signal"
    # no node starts after the signal: at most the one starting as it was sent
    started_after = {p.parent for p in work.rglob("_report")} - before
    assert len(started_after) <= 1, sorted(map(str, started_after))


def test_a_rerun_after_sigterm_completes_and_nothing_is_half_written(tiny_bids, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [sys.executable, str(REPO / "bin" / "brainage"), str(tiny_bids), str(out), "participant",
            "--participant-label", "01", "-w", str(work), "--nprocs", "1", "--omp-nthreads", "1",
            "--models", "none", "--skip-bids-validation"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    # signal it once preprocessing has produced results, in the middle of the participant
    while len(list(work.rglob("result_*.pklz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be signalled"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert list(out.rglob("*.part")) == []
    assert not (out / "sub-01" / "anat" / "sub-01_qc.json").exists()  # the participant was not finished

    # nodes nipype had marked complete (final hash file); a node caught while saving is not
    finished = {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")
                if any(not h.name.endswith("_unfinished.json") for h in p.parent.glob("_0x*.json"))}

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert list(out.rglob("*.part")) == [] and not (out / ".brainage-locks").exists()
    anat = out / "sub-01" / "anat"
    images = sorted(anat.glob("*.nii.gz"))
    assert anat / "sub-01_desc-preproc_T1w.nii.gz" in images and len(images) >= 5
    for image in images:
        assert np.isfinite(nib.load(image).get_fdata()).all(), image.name  # complete, readable
    assert json.loads((anat / "sub-01_qc.json").read_text())["source"] == "sub-01/anat/sub-01_T1w.nii.gz"
    assert (out / "sub-01.html").is_file()
    # it resumed: the nodes finished before the signal were reused, not run again
    rerun_nodes = [p.parent.name for p, t in finished.items() if p.stat().st_mtime_ns != t]
    assert finished and rerun_nodes == [], rerun_nodes


_SIGNAL_THEN_UNRELATED_FAILURE = """
import os, signal, sys
import bidsapp.cli.run as cli_run
from bidsapp.errors import ParticipantFailure

def _run(config):
    try:  # a signal inside some library call; the library swallows it ...
        os.kill(os.getpid(), signal.{name})
    except BaseException:
        pass
    # ... and what surfaces later is an unrelated failure (a half-imported module)
    raise ParticipantFailure("1 of 1 T1w image(s) failed")

cli_run.run = _run
sys.exit(cli_run.main([sys.argv[1], sys.argv[2], "participant", "--skip-bids-validation"]))
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_swallowed_by_a_library_still_exits_130(tiny_bids, tmp_path, name):
    """The exit code comes from the signal having arrived, not from the exception that surfaces:
    a SIGINT landing inside a lazy ``import pandas`` once turned a Ctrl-C into exit 1."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_THEN_UNRELATED_FAILURE.format(name=name),
                           str(tiny_bids), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          preexec_fn=_interruptible)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted" in proc.stderr
