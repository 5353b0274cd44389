"""Reliability: the same participant started twice at once into one output directory.

The first run wins and finishes; the second is refused at once with exit 75 and one line that
names the holder and the lock file, and writes nothing (no run record, no work directory).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bidsapp.locking import LOCK_DIR, lock_path

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _argv(bids: Path, out: Path, work: Path) -> list[str]:
    return [sys.executable, str(REPO / "bin" / "brainage"), str(bids), str(out), "participant",
            "--participant-label", "01", "-w", str(work), "--nprocs", "1", "--omp-nthreads", "1",
            "--models", "none", "--skip-bids-validation"]


def test_one_run_wins_cleanly_and_the_other_reports_it(tiny_bids, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(_argv(tiny_bids, out, tmp_path / "work-a"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = lock_path(out, "01")
    deadline = time.monotonic() + 300
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None and lock.exists(), "the first run ended before the second could start"

    second = subprocess.run(_argv(tiny_bids, out, tmp_path / "work-b"), capture_output=True, text=True,
                            timeout=300)
    assert first.poll() is None, "the first run finished while the second ran: nothing was contested"
    assert second.returncode == 75, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    holder = json.loads(lock.read_text())
    assert "ERROR" in last and "sub-01 is being processed into this output directory" in last
    assert f"process {holder['pid']}" in last and str(lock) in last
    assert "Traceback" not in second.stderr
    assert not (tmp_path / "work-b").exists()

    _, err = first.communicate(timeout=1200)
    assert first.returncode == 0, err[-2000:]
    records = list((out / "logs").glob("config-*.json"))
    assert [r.name for r in records] == [f"config-{holder['run_uuid']}.json"]  # only the winner's
    assert (out / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz").is_file()
    assert (out / "sub-01.html").is_file()
    assert list(out.rglob("*.part")) == [] and not (out / LOCK_DIR).exists()
