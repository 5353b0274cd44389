"""Timing helper shared by the benchmark scripts (each script's folder is on ``sys.path``)."""

from __future__ import annotations

import time
from typing import Any, Callable


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Run ``fn`` ``repeats`` times; the fastest wall time in seconds and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def add_mni_scan_arguments(parser, repo, repeats: int = 2) -> None:
    """The options of the benchmarks that run a model on one MNI-space T1w."""
    from pathlib import Path

    parser.add_argument("--models-dir", type=Path, default=repo / "models")
    parser.add_argument("--derivatives", type=Path, default=repo.parent / "derivs" / "ixi")
    parser.add_argument("--std-t1w", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")


def mni_scan(args):
    """``--std-t1w``, else the first participant-level 2 mm MNI-space T1w under ``--derivatives``;
    also applies ``--threads``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    scan = args.std_t1w or next(iter(sorted(args.derivatives.glob(
        "sub-*/anat/sub-*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"))), None)
    if scan is None:
        raise SystemExit(f"no MNI-space T1w under {args.derivatives}: pass --std-t1w")
    return scan
