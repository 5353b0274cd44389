"""Simulated test–retest: re-acquire real T1w scans in silico and measure voxelwise ICC(2,1).

Seed 000 reports the within-scanner reliability of local brain age as the median over voxels of
ICC(2,1) between two sessions (0.98, n = 20).  No repeat scans of adults are available here, so a
second session is simulated from each real scan by what differs between two acquisitions on the
same scanner:

* head position: a random rigid motion (rotations about the image centre, translations; in mm
  of the scanner space, so the same for any voxel size), applied by cubic-spline resampling of
  the voxel data while the header stays that of the first session;
* receive-coil bias: a smooth multiplicative field (MONAI ``RandBiasField``: exponential of a
  random polynomial);
* thermal noise: Rician noise (MONAI ``RandRicianNoise``) with an SD that is a fraction of the
  scan's 99th intensity percentile.

:func:`make_retest_dataset` writes a two-session BIDS dataset (``ses-1`` the original, ``ses-2``
its re-acquisition) that goes through the whole participant level like any other;
:func:`voxel_icc` reads back the brain-age maps.  Run from a checkout::

    python -m training.test_retest ../shared/data/ixi-hh WORK_DIR --n 10

It prints (and writes to ``WORK_DIR/test_retest.json``) the ICC(2,1) of every model's global
brain age, the voxel ICC of local-unet's brain-age maps when that model ran, and the group
level's ICC rows (voxel median of the smoothed modulated GM/WM maps and of PAD maps, global).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = ["rigid_matrix", "simulate_reacquisition", "make_retest_dataset", "voxel_icc",
           "global_icc", "main"]


def rigid_matrix(angles_deg: Sequence[float], translation_mm: Sequence[float],
                 centre_mm: Sequence[float]) -> np.ndarray:
    """4x4 rigid transform in scanner mm: rotations about ``centre_mm`` (x, y, z), then a shift.

    Examples
    --------
    >>> m = rigid_matrix([0, 0, 90], [1, 0, 0], [0, 0, 0])
    >>> np.round(m @ [1, 0, 0, 1], 6).tolist()
    [1.0, 1.0, 0.0, 1.0]
    """
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    centre = np.asarray(centre_mm, dtype=float)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre - rot @ centre + np.asarray(translation_mm, dtype=float)
    return out


def simulate_reacquisition(img: nib.Nifti1Image, rng: np.random.Generator, *,
                           max_rotation_deg: float = 2.0, max_translation_mm: float = 2.0,
                           bias_coeff_range: tuple[float, float] = (0.0, 0.1),
                           noise_fraction: float = 0.01) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """A second acquisition of ``img``: rigid head motion, a new bias field, new noise.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        A 3D scan (its header and affine are kept).
    rng : numpy.random.Generator
        Source of every random parameter (motion, MONAI's seeds).
    max_rotation_deg, max_translation_mm : float
        Rotations about each axis and translations along each are uniform in ``[-max, max]``.
    bias_coeff_range : (float, float)
        Range of the polynomial coefficients of MONAI's ``RandBiasField`` (degree 3).
    noise_fraction : float
        SD of the Rician noise as a fraction of the 99th percentile of the scan's intensities.

    Returns
    -------
    (nibabel.Nifti1Image, dict)
        The float32 re-acquisition and the parameters drawn (JSON-serialisable).
    """
    from monai.transforms import RandBiasField, RandRicianNoise

    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D scan, got shape {data.shape}")
    affine = img.affine
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    shift = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    centre = affine @ np.append((np.asarray(data.shape) - 1) / 2.0, 1.0)
    motion = rigid_matrix(angles, shift, centre[:3])
    # output voxel v shows the head at scanner point motion^-1 (A v): the head moved by `motion`
    voxel_map = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    moved = ndimage.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3], order=3,
                                     mode="constant", cval=0.0)
    moved = np.clip(moved, 0.0, None)
    scale = float(np.percentile(data, 99))
    bias = RandBiasField(degree=3, coeff_range=bias_coeff_range, prob=1.0)
    bias.set_random_state(seed=int(rng.integers(2 ** 31)))
    noise = RandRicianNoise(prob=1.0, mean=0.0, std=noise_fraction * scale, relative=False,
                            sample_std=False)
    noise.set_random_state(seed=int(rng.integers(2 ** 31)))
    out = np.asarray(noise(bias(moved[None]))[0], dtype=np.float32)
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    new = nib.Nifti1Image(out, affine, header)
    params = {"rotation_deg_xyz": [round(float(a), 4) for a in angles],
              "translation_mm_xyz": [round(float(t), 4) for t in shift],
              "bias_coeff_range": list(bias_coeff_range),
              "noise_sd": round(noise_fraction * scale, 4), "noise_fraction_of_p99": noise_fraction}
    return new, params


def _pick(participants: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` participants evenly spread over the age range (deterministic)."""
    table = participants.dropna(subset=["age"]).sort_values(["age", "participant_id"])
    if n > len(table):
        raise ValueError(f"asked for {n} participants, the dataset has {len(table)} with an age")
    index = np.unique(np.round(np.linspace(0, len(table) - 1, n)).astype(int))
    return table.iloc[index]


def make_retest_dataset(bids_dir: Path, out_dir: Path, n: int, seed: int = 0,
                        **simulation: Any) -> pd.DataFrame:
    """Write a two-session BIDS dataset: each picked T1w as ``ses-1``, a re-acquisition as ``ses-2``.

    Returns the participants table written (with the simulation parameters in
    ``out_dir/sourcedata/reacquisition.json``).
    """
    bids_dir, out_dir = Path(bids_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; give a new folder")
    participants = pd.read_csv(bids_dir / "participants.tsv", sep="\t")
    picked = _pick(participants, n)
    rng = np.random.default_rng(seed)
    tmp = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    log = {}
    for pid in picked["participant_id"]:
        sources = sorted((bids_dir / pid).glob(f"**/anat/{pid}_*T1w.nii.gz"))
        if not sources:
            raise FileNotFoundError(f"no T1w for {pid} under {bids_dir / pid}")
        anat = [tmp / pid / f"ses-{s}" / "anat" for s in (1, 2)]
        for folder in anat:
            folder.mkdir(parents=True)
        shutil.copyfile(sources[0], anat[0] / f"{pid}_ses-1_T1w.nii.gz")
        retest, params = simulate_reacquisition(nib.load(sources[0]), rng, **simulation)
        nib.save(retest, anat[1] / f"{pid}_ses-2_T1w.nii.gz")
        sidecar = sources[0].with_name(sources[0].name.replace(".nii.gz", ".json"))
        for s, folder in zip((1, 2), anat):
            if sidecar.is_file():
                shutil.copyfile(sidecar, folder / f"{pid}_ses-{s}_T1w.json")
        log[pid] = {"source": str(sources[0].relative_to(bids_dir)), **params}
    picked.to_csv(tmp / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    description = {"Name": f"Simulated test-retest of {n} scans of {bids_dir.name}",
                   "BIDSVersion": "1.9.0", "DatasetType": "raw",
                   "GeneratedBy": [{"Name": "brainage training.test_retest",
                                    "Description": "ses-2 = ses-1 after random rigid motion, a "
                                                   "bias field and Rician noise"}]}
    (tmp / "dataset_description.json").write_text(json.dumps(description, indent=2))
    (tmp / "sourcedata").mkdir()
    (tmp / "sourcedata" / "reacquisition.json").write_text(json.dumps(log, indent=1))
    tmp.replace(out_dir)
    return picked


def voxel_icc(output_dir: Path, participants: Sequence[str], suffix: str = "brainagemap",
              model_desc: str = "localunet") -> dict[str, Any]:
    """ICC(2,1) per voxel between ``ses-1`` and ``ses-2`` brain-age maps of the participant level.

    Returns the median, quartiles and fraction above 0.9 over the voxels inside every map, and the
    ICC of the global values (the maps' means).
    """
    from bidsapp.stats import icc

    ratings, globals_ = [], []
    for pid in participants:
        maps = []
        for s in (1, 2):
            found = sorted(Path(output_dir).glob(
                f"{pid}/ses-{s}/anat/{pid}_ses-{s}_*desc-{model_desc}*_{suffix}.nii.gz"))
            if len(found) != 1:
                raise FileNotFoundError(f"expected one {suffix} of {pid} ses-{s} under "
                                        f"{output_dir}, found {len(found)}")
            maps.append(np.asarray(nib.load(found[0]).dataobj, dtype=np.float64))
        ratings.append(maps)
    y = np.asarray(ratings)  # (participants, sessions, x, y, z)
    inside = np.all(np.isfinite(y), axis=(0, 1))
    values = np.asarray(icc(y[:, :, inside], "2,1"), dtype=float)
    values = values[np.isfinite(values)]
    globals_ = np.nanmean(np.where(inside, y, np.nan), axis=(2, 3, 4))
    return {"n_participants": len(participants), "n_voxels": int(values.size),
            "median_icc_2_1": float(np.median(values)),
            "quartiles_icc_2_1": [float(q) for q in np.percentile(values, [25, 75])],
            "fraction_above_0_9": float(np.mean(values > 0.9)),
            "global_icc_2_1": float(icc(globals_, "2,1")),
            "global_abs_difference_years": [float(v)
                                            for v in np.abs(globals_[:, 0] - globals_[:, 1])]}


def global_icc(output_dir: Path, participants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """ICC(2,1) of each model's global brain age between the sessions (``_brainage.tsv``).

    Returns ``{model: {"icc_2_1", "median_abs_difference_years", "n"}}`` for the models with
    a value in both sessions of every participant.
    """
    from bidsapp.stats import icc

    values: dict[str, list[list[float]]] = {}
    for pid in participants:
        per_session = []
        for s in (1, 2):
            found = sorted(Path(output_dir).glob(f"{pid}/ses-{s}/anat/{pid}_ses-{s}_*brainage.tsv"))
            if len(found) != 1:
                raise FileNotFoundError(f"expected one _brainage.tsv of {pid} ses-{s} under "
                                        f"{output_dir}, found {len(found)}")
            table = pd.read_csv(found[0], sep="\t", na_values="n/a")
            per_session.append(dict(zip(table["model"], table["brain_age"])))
        for model in per_session[0]:
            pair = [per_session[0].get(model), per_session[1].get(model)]
            values.setdefault(model, []).append(pair)
    out = {}
    for model, pairs in values.items():
        y = np.asarray(pairs, dtype=float)
        if len(y) == len(participants) and np.all(np.isfinite(y)):
            out[model] = {"icc_2_1": float(icc(y, "2,1")), "n": int(len(y)),
                          "median_abs_difference_years":
                              float(np.median(np.abs(y[:, 0] - y[:, 1])))}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.test_retest",
        description="Simulated test-retest of the participant level: voxelwise ICC(2,1) of "
                    "brain-age maps between real scans and their simulated re-acquisitions.")
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("work_dir", type=Path, help="new folder for the dataset and outputs")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["all"])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--omp-nthreads", type=int, default=1)
    parser.add_argument("--vbm-fwhm", type=float, default=4.0,
                        help="smoothed modulated GM/WM maps (their voxel ICC is the group level's)")
    parser.add_argument("--n-perm", type=int, default=100,
                        help="group-level permutations (the ICCs do not use them)")
    args = parser.parse_args(argv)
    bids = args.work_dir / "bids"
    out = args.work_dir / "derivatives"
    if not bids.exists():
        picked = make_retest_dataset(args.bids_dir, bids, args.n, args.seed)
    else:
        picked = pd.read_csv(bids / "participants.tsv", sep="\t")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bidsapp", str(bids), str(out), "participant",
                    "--models", *args.models, "--vbm-fwhm", str(args.vbm_fwhm),
                    "--nprocs", str(args.nprocs), "--omp-nthreads", str(args.omp_nthreads),
                    "-w", str(args.work_dir / "work")], check=True)
    participant_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bidsapp", str(bids), str(out), "group",
                    "--n-perm", str(args.n_perm)], check=True)
    group_s = time.perf_counter() - t0
    result = {"participant_seconds": participant_s, "group_seconds": group_s,
              "scans": 2 * len(picked)}
    pids = list(picked["participant_id"])
    result["global"] = global_icc(out, pids)
    maps = sorted(out.glob("sub-*/ses-1/anat/*desc-localunet*_brainagemap.nii.gz"))
    if maps:
        result["local_unet_maps"] = voxel_icc(out, pids)
    stats = sorted(out.rglob("group_stats.tsv"))
    if stats:
        table = pd.read_csv(stats[0], sep="\t")
        rows = table[table["test"] == "icc_2_1"]
        result["group_engine_icc_2_1"] = rows[rows["level"] != "roi"][
            ["model", "level", "region", "statistic"]].to_dict(orient="records")
    (args.work_dir / "test_retest.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
