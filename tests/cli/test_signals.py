"""SIGTERM (scancel, a batch time limit, docker stop) during a participant run: exit 130 at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_during_a_serial_run_stops_it_with_130(tiny_bids, tmp_path):
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(REPO / "bin" / "brainage"), str(tiny_bids), str(tmp_path / "out"),
                             "participant", "-w", str(work), "--nprocs", "1", "--omp-nthreads", "1",
                             "--models", "none", "--skip-bids-validation"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(work.rglob("_report")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the first nipype node runs
    assert proc.poll() is None, "the run ended before it could be signalled"
    before = {p.parent for p in work.rglob("_report")}
    os.kill(proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    # nipype logs the node it was running as failed; brainage's last word is the interruption
    assert "interrupted: finished files are kept" in err.strip().splitlines()[-1]
    assert time.monotonic() - signalled < 60, "the run went on with other nodes after SIGTERM"
    # no node starts after the signal: at most the one starting as it was sent
    started_after = {p.parent for p in work.rglob("_report")} - before
    assert len(started_after) <= 1, sorted(map(str, started_after))
