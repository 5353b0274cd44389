"""Per-participant locks: one run per participant and output directory, never a stale lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bidsapp.locking import LOCK_DIR, ParticipantLocks, lock_path


def test_a_second_run_is_refused_the_held_participants_only(tmp_path):
    with ParticipantLocks(tmp_path, "run-a") as first:
        assert first.acquire(["01", "02"]) == {} and first.held == ["01", "02"]
        assert first.acquire(["01"]) == {}  # re-acquiring its own lock is a no-op
        second = ParticipantLocks(tmp_path, "run-b")
        busy = second.acquire(["02", "03"])
        assert list(busy) == ["02"] and second.held == ["03"]
        message = busy["02"]
        assert f"process {os.getpid()}" in message and "run run-a" in message
        assert str(lock_path(tmp_path, "02")) in message
        second.release()
        assert not lock_path(tmp_path, "03").exists() and lock_path(tmp_path, "02").exists()
    # released: the lock files and their folder are gone, and anybody may lock again
    assert not (tmp_path / LOCK_DIR).exists()
    with ParticipantLocks(tmp_path, "run-c") as third:
        assert third.acquire(["01", "02"]) == {}
        assert json.loads(lock_path(tmp_path, "01").read_text())["run_uuid"] == "run-c"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from bidsapp.locking import ParticipantLocks\n"
         f"locks = ParticipantLocks({str(tmp_path)!r}, 'killed')\n"
         "assert locks.acquire(['01']) == {}\n"
         "print('locked', flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert list(ParticipantLocks(tmp_path, "waiting").acquire(["01"])) == ["01"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert lock_path(tmp_path, "01").exists()  # SIGKILL left the file ...
    with ParticipantLocks(tmp_path, "after") as locks:
        assert locks.acquire(["01"]) == {}  # ... but not the lock


def test_a_lock_file_removed_while_being_locked_is_replaced(tmp_path, monkeypatch):
    """The holder unlinks its file as it finishes; a run that opened that file locks a new one."""
    import bidsapp.locking as locking

    path = lock_path(tmp_path, "01")
    path.parent.mkdir()
    real_flock, calls = locking.fcntl.flock, []

    def flock_then_unlink(fd, operation):  # the unlink lands between open() and flock()
        real_flock(fd, operation)
        if not calls:
            os.unlink(path)
        calls.append(fd)

    monkeypatch.setattr(locking.fcntl, "flock", flock_then_unlink)
    with ParticipantLocks(tmp_path, "run") as locks:
        assert locks.acquire(["01"]) == {}
        assert len(calls) == 2 and path.exists()
        assert os.fstat(locks._held["01"]).st_ino == os.stat(path).st_ino


def test_the_lock_record_names_the_holder(tmp_path):
    with ParticipantLocks(tmp_path, "abc") as locks:
        locks.acquire(["01"])
        record = json.loads(lock_path(tmp_path, "01").read_text())
    assert record["pid"] == os.getpid() and record["run_uuid"] == "abc"
    assert abs(time.mktime(time.strptime(record["started"], "%Y-%m-%dT%H:%M:%S")) - time.time()) < 60


def _unit(subject, session):
    from types import SimpleNamespace

    return SimpleNamespace(source=SimpleNamespace(subject=subject), session=session)


def test_held_participants_are_left_out_and_a_run_with_none_left_is_refused(caplog):
    import pytest

    from bidsapp.cli.participant import _without_busy
    from bidsapp.errors import ParticipantBusyError

    a1, a2, b, c = _unit("01", "A"), _unit("01", "B"), _unit("02", None), _unit("03", None)
    busy = {"01": "sub-01 is being processed into this output directory by process 9"}
    units, good, bad = _without_busy(busy, [a1, a2, b, c], [a1, a2, b], [(c, "unusable")])
    assert units == [b, c] and good == [b] and bad == [(c, "unusable")]
    assert "sub-01 is being processed" in caplog.text
    # nothing usable left besides the held participant: refused (exit 75), with the holder's words
    with pytest.raises(ParticipantBusyError, match="^sub-01 is being processed"):
        _without_busy(busy, [a1, a2], [a1, a2], [])
    with pytest.raises(ParticipantBusyError, match="1 selected participant.*no usable T1w"):
        _without_busy(busy, [a1, c], [a1], [(c, "unusable")])
