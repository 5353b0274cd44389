"""Peak memory of one participant run with every shipped model, against the 4 GB target.

Usage::

    python benchmarks/participant_memory.py [--t1w-dataset DIR] [--participant LABEL] [--models all]

Runs ``brainage DATASET OUT participant --participant-label LABEL --models all --nprocs 1
--omp-nthreads 1`` in a subprocess (preprocessing, every shipped model, explanation maps and the
report) on the first IXI scan under ``../shared/data/ixi-hh`` unless told otherwise, into
temporary folders.  While it runs, the resident memory of the whole process tree (the run and
every child it starts) is summed from ``/proc`` every 0.1 s; the peak of that sum is the
participant's memory need.  The largest single process (``RUSAGE_CHILDREN``) is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_GB = 4.0

__all__ = ["main", "tree_rss_bytes"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Linux ``/proc``), in bytes."""
    total, stack, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/statm").read_text().split()
            total += int(fields[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # the process ended between the listing and the read
        stack.extend(_children(current))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path,
                        default=Path(os.environ.get("BRAINAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
                        / "ixi-hh")
    parser.add_argument("--participant", default=None, help="label (default: the first participant)")
    parser.add_argument("--models", default="all")
    args = parser.parse_args(argv)
    if args.participant is None:
        found = sorted(p.name[4:] for p in args.dataset.glob("sub-*") if p.is_dir())
        if not found:
            raise SystemExit(f"no participant under {args.dataset}: pass --dataset")
        args.participant = found[0]
    with tempfile.TemporaryDirectory(prefix="brainage-mem-") as tmp:
        cmd = [sys.executable, "-m", "bidsapp", str(args.dataset), f"{tmp}/out", "participant",
               "--participant-label", args.participant, "--models", args.models, "--nprocs", "1",
               "--omp-nthreads", "1", "-w", f"{tmp}/work", "--skip-bids-validation"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(0.1)
        err = proc.stderr.read()
        wall = time.monotonic() - start
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
        raise SystemExit(f"brainage exited {proc.returncode}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    models = [line.split("models: ", 1)[1] for line in err.splitlines() if "models: " in line]
    print(f"participant sub-{args.participant}, models: {models[0] if models else args.models}; "
          f"wall {wall:.0f} s")
    print(f"{'measure':<40}{'GB':>8}{'target GB':>11}{'ratio':>8}")
    for name, value in (("peak RSS of the process tree (sum)", peak / 1024**3),
                        ("largest single process (ru_maxrss)", largest)):
        print(f"{name:<40}{value:>8.2f}{TARGET_GB:>11.1f}{value / TARGET_GB:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
