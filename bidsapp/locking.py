"""Per-participant locks in ``output_dir``: two runs never write the same participant at once.

SLURM arrays and impatient users start ``brainage`` twice on the same participant (a resubmitted
task, a second terminal).  Both would write the same derivatives, each replacing the other's
files one by one, so the participant would end up with a mix of two runs.  Each run therefore
takes an exclusive, non-blocking ``flock`` on ``<output_dir>/.brainage-locks/sub-<label>.lock``
before it processes that participant; a second run finds the lock taken and reports who holds it.

``flock`` locks belong to the open file and the kernel drops them when the holder dies, even by
SIGKILL or an out-of-memory kill, so a crashed run never leaves a stale lock behind.  (On network
file systems ``flock`` is honoured across nodes by NFSv4 and by Lustre mounted with ``-o flock``.)
A holder removes its lock file when it finishes; a run that acquired a lock checks that the file
it locked is still the one at the path, so removal cannot hand the same participant to two runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

__all__ = ["LOCK_DIR", "ParticipantLocks", "lock_path"]

#: Hidden folder of ``output_dir`` holding the lock files (BIDS validators ignore dot files).
LOCK_DIR = ".brainage-locks"


def lock_path(output_dir: str | os.PathLike, subject: str) -> Path:
    """The lock file of participant ``subject`` (label without ``sub-``)."""
    return Path(output_dir) / LOCK_DIR / f"sub-{subject}.lock"


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words, from what the holder wrote into it."""
    try:
        info = json.loads(path.read_text())
        return (f"process {info['pid']} on {info['host']} (run {info['run_uuid']}, "
                f"started {info['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it has just created the file and not written it yet


@dataclass
class ParticipantLocks(AbstractContextManager):
    """Exclusive locks on participants of one output directory, held until :meth:`release`.

    Parameters
    ----------
    output_dir : path-like
        The derivatives folder that the run writes into.
    run_uuid : str
        Written into each lock file, so that a refused run can say which run holds it.

    Examples
    --------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with ParticipantLocks(out, "run-a") as first, ParticipantLocks(out, "run-b") as second:
    ...     first.acquire(["01", "02"]), sorted(second.acquire(["02", "03"]))
    ({}, ['02'])
    """

    output_dir: str | os.PathLike
    run_uuid: str
    _held: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def acquire(self, subjects: Iterable[str]) -> dict[str, str]:
        """Lock every participant not held by another run.

        Returns
        -------
        dict
            The participants that another run holds, each with a sentence naming the holder
            and the lock file; empty when every participant was locked.
        """
        busy = {}
        for subject in subjects:
            if subject in self._held:
                continue
            fd = self._try_lock(lock_path(self.output_dir, subject))
            if fd is None:
                path = lock_path(self.output_dir, subject)
                busy[subject] = (f"sub-{subject} is being processed into this output directory by "
                                 f"{_holder(path)}; wait until that run ends, then run again (the "
                                 f"lock {path} is released when it stops, even if it is killed)")
            else:
                self._held[subject] = fd
        return busy

    @property
    def held(self) -> list[str]:
        """The participants this object holds, sorted."""
        return sorted(self._held)

    def _try_lock(self, path: Path) -> int | None:
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the folder was removed by a holder that just finished
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked the file we opened: lock the new one
                os.close(fd)
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(), "run_uuid": self.run_uuid,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            return fd

    def release(self) -> None:
        """Remove and unlock every lock held (unlink first, so no run locks a dying file)."""
        for subject, fd in sorted(self._held.items()):
            try:
                os.unlink(lock_path(self.output_dir, subject))
            except FileNotFoundError:
                pass
            os.close(fd)
        self._held.clear()
        try:
            (Path(self.output_dir) / LOCK_DIR).rmdir()
        except OSError:
            pass  # not empty: another run holds a participant

    def __exit__(self, *exc_info) -> None:
        self.release()
