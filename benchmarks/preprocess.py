"""Benchmark the anatomical preprocessing: wall seconds per stage for a 2 mm and a 1 mm T1w.

Usage::

    python benchmarks/preprocess.py [--t1w PATH] [--omp-nthreads 2] [--work-dir DIR] [--skip-1mm]

Without ``--t1w`` it takes the first IXI scan under ``../shared/data/ixi-hh`` (or
``$BRAINAGE_SHARED_DATA/ixi-hh``).  The 1 mm input is that scan resampled (trilinear) to 1 mm in a
temporary folder -- the benchmark never writes scans into the repository.  Each workflow runs with
nipype's Linear plugin in this process, so the peak resident memory printed is the per-subject peak.
CPU seconds (all threads) are printed beside wall seconds: on a shared machine wall time inflates
with other jobs' load, CPU time much less (with 2 free cores, wall >= CPU / 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

__all__ = ["main"]


def _default_t1w() -> Path:
    root = Path(os.environ.get("BRAINAGE_SHARED_DATA", REPO.parent / "shared" / "data")) / "ixi-hh"
    found = sorted(root.glob("sub-*/anat/sub-*_T1w.nii.gz"))
    if not found:
        raise SystemExit(f"no IXI T1w under {root}: pass --t1w")
    return found[0]


def _resample_1mm(src: Path, dst: Path) -> Path:
    import nibabel as nib

    from bidsapp.anat.grid import grid_spacing, resample_to_grid

    img = nib.load(str(src))
    zooms = grid_spacing(img.affine)
    factor = zooms / 1.0
    shape = tuple(int(round(n * f)) for n, f in zip(img.shape[:3], factor))
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] / factor
    # keep the field of view: the new first voxel centre sits half a new voxel inside the old edge
    affine[:3, 3] = img.affine[:3, :3] @ ((1.0 / factor - 1.0) / 2.0) + img.affine[:3, 3]
    resample_to_grid(img, shape, affine, order=1, antialias=False).to_filename(dst)
    return dst


def _run(t1w: Path, work: Path, omp_nthreads: int, seed: int) -> dict:
    from bidsapp.workflows.anatomical import init_anat_preproc_wf

    wf = init_anat_preproc_wf(omp_nthreads=omp_nthreads, random_seed=seed, vbm_fwhm=4.0, name="bench_wf")
    wf.base_dir = str(work)
    wf.inputs.inputnode.t1w = str(t1w)
    started = time.perf_counter()
    graph = wf.run(plugin="Linear")
    wall = time.perf_counter() - started
    qc_node = next(n for n in graph.nodes() if n.name == "qc")
    qc = json.loads(Path(qc_node.result.outputs.out_qc).read_text())
    return {"wall": wall, "qc": qc}


def _print(label: str, t1w: Path, result: dict) -> None:
    qc = result["qc"]
    print(f"\n== {label}: {t1w.name}  shape {qc['input']['shape']}  voxel {qc['input']['voxel_size_mm']} mm")
    cpu = qc.get("cpu_seconds", {})
    print(f"  {'stage':<18s} {'wall s':>8s} {'CPU s':>8s}")
    for stage, sec in qc["seconds"].items():
        print(f"  {stage:<18s} {sec:8.1f} {cpu.get(stage, float('nan')):8.1f}")
    print(f"  {'workflow wall':<18s} {result['wall']:8.1f} s  (stages + nipype overhead)")
    print(f"  mask {qc['mask_volume_ml']:.0f} mL  GM {qc['gm_volume_ml']:.0f}  WM {qc['wm_volume_ml']:.0f}  "
          f"CSF {qc['csf_volume_ml']:.0f} mL  similarity {qc['registration_similarity']:.3f}")
    mod = qc["modulated_volume_ml"]
    print(f"  modulated GM at 2 / 1.5 mm: {mod['res2_gm']:.1f} / {mod['res1p5_gm']:.1f} mL "
          f"(native {mod['native_gm']:.1f} mL)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t1w", type=Path, default=None, help="2 mm T1w to time (default: first IXI scan)")
    parser.add_argument("--omp-nthreads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="nipype work dir (default: temporary)")
    parser.add_argument("--skip-1mm", action="store_true", help="time the given scan only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t1w = args.t1w or _default_t1w()
    load = os.getloadavg()[0]
    print(f"brainage preprocessing benchmark: omp_nthreads={args.omp_nthreads}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="brainage_bench_") as tmp:
        work = args.work_dir or Path(tmp) / "work"
        results = [("input", t1w, _run(t1w, work / "native", args.omp_nthreads, args.seed))]
        if not args.skip_1mm:
            one_mm = _resample_1mm(t1w, Path(tmp) / "t1w_1mm.nii.gz")
            results.append(("resampled to 1 mm", one_mm, _run(one_mm, work / "1mm", args.omp_nthreads, args.seed)))
        for label, path, result in results:
            _print(label, path, result)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"\npeak resident memory of this process: {peak_gb:.2f} GB; load average now "
          f"{os.getloadavg()[0]:.1f} (others' jobs inflate wall times)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
