"""Train the CBV synthesis network (seed 003, AICBV) on paired T1w / CBV scans.

No paired T1w / gadolinium CBV data set is public, so brainage ships **no CBV synthesis
weights**; the ``vgg-cbv`` model's CBV branch runs only when the user supplies a checkpoint
trained here on their own pairs (``cbv_synth.pt``, read by :func:`bidsapp.nets.cbv_synth.load_cbv_synth`)
or measured CBV maps.

Where the pairs are found (:func:`find_cbv_pairs`)
--------------------------------------------------
For every raw T1w ``sub-<l>[/ses-<s>]/anat/<entities>_T1w.nii[.gz]`` of the BIDS dataset:

1. the T1w candidates are, in this order, the participant level's
   ``<entities>_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz`` in any derivatives
   folder, then the raw T1w itself;
2. the CBV map of a candidate has the candidate's file name with ``_T1w`` replaced by ``_cbv``
   (``desc-`` may be left out), ``.nii`` or ``.nii.gz``, in the same ``sub-<l>[/ses-<s>]/anat``
   folder of the BIDS dataset or of any derivatives folder, e.g. ``sub-01_cbv.nii.gz`` for the
   raw ``sub-01_T1w.nii.gz``, ``sub-01_space-MNI152NLin2009aSym_res-2_cbv.nii.gz`` for the
   MNI-space derivative;
3. the first candidate with a CBV map makes the pair; T1w images without one are skipped, and
   no pair at all raises :class:`bidsapp.errors.InputMissingError`.

A pair must share one voxel grid (the CBV map registered to the T1w).

Training (:func:`train_cbv_synthesis`)
--------------------------------------
The brain is the non-zero T1w (skull-stripped inputs such as the MNI derivative); the T1w is
divided by the mean of its top 1 % intensities, the CBV by its brain median and zeroed outside
the brain.  Each epoch draws ``patches_per_scan`` cubic patches per pair centred on random brain
voxels (``numpy`` generator seeded by ``(seed, epoch)``), minimises the L1 loss with Adam and
writes ``checkpoint_latest.pt`` (weights, optimiser, progress; ``weights_only``-loadable) and
``loss.csv``; the end writes ``cbv_synth.pt``.  ``resume=True`` continues from the latest
checkpoint and, on a CPU, ends with the same weights as an uninterrupted run of the same seed.

``python -m training.cbv_synth --bids DIR [--derivatives DIR ...] --out DIR`` runs it from the
command line (``--help`` lists the options; ``--config training/configs/cbv-synth-cpu.toml``
reads them from a file).  :func:`make_synthetic_pairs` writes a small paired data set for tests.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bidsapp.derivatives import TEMPLATE_SPACE, SourceEntities, derivative_path
from bidsapp.errors import ImageError, InputMissingError, UsageError
from bidsapp.nets.cbv_synth import CBV_CHECKPOINT_FORMAT, CBVSynthNet, normalise_t1w

from .distributed import resolve_device

__all__ = ["CBVPair", "find_cbv_pairs", "load_pair", "normalise_cbv", "sample_patch_corners",
           "train_cbv_synthesis", "CBVTrainResult", "make_synthetic_pairs", "build_parser", "main"]

LOGGER = logging.getLogger("brainage.training.cbv_synth")
_T1W_GLOBS = ("sub-*/anat/*_T1w.nii", "sub-*/anat/*_T1w.nii.gz",
              "sub-*/ses-*/anat/*_T1w.nii", "sub-*/ses-*/anat/*_T1w.nii.gz")
_CSV_FIELDS = ("epoch", "steps", "train_l1", "seconds")
_MODEL_KEYS = ("channels", "ssm_blocks", "d_state", "scan_paths")
#: Network of the CPU-sized default run (the paper gives no sizes beyond 9 bottleneck blocks).
DEFAULT_MODEL = {"channels": [16, 32, 64], "ssm_blocks": 2, "d_state": 16, "scan_paths": 2}


@dataclass(frozen=True)
class CBVPair:
    """One T1w image and the CBV map on its grid.

    Parameters
    ----------
    t1w, cbv : Path
    """

    t1w: Path
    cbv: Path

    @property
    def name(self) -> str:
        """The T1w's entities, e.g. ``sub-01_ses-A``."""
        return SourceEntities.from_path(self.t1w).prefix


def _cbv_names(t1w: Path) -> list[str]:
    stem = re.sub(r"_T1w\.nii(\.gz)?$", "_cbv", t1w.name)
    stems = dict.fromkeys([stem, re.sub(r"_desc-[A-Za-z0-9]+", "", stem)])
    return [s + ext for s in stems for ext in (".nii.gz", ".nii")]


def find_cbv_pairs(bids_dir: str | Path, derivatives: Sequence[str | Path] = ()) -> list[CBVPair]:
    """Pair each T1w of a BIDS dataset with its CBV map (naming rules in the module docstring).

    Parameters
    ----------
    bids_dir : path
        BIDS dataset with raw ``*_T1w.nii[.gz]`` images.
    derivatives : sequence of path
        Folders also searched for preprocessed T1w images and CBV maps.

    Returns
    -------
    list of CBVPair
        In sorted order of the raw T1w paths.

    Raises
    ------
    InputMissingError
        When ``bids_dir`` or a derivatives folder does not exist, there is no T1w, or no T1w
        has a CBV map (the message names the files looked for).
    """
    bids = Path(bids_dir)
    roots = [bids, *map(Path, derivatives)]
    for root in roots:
        if not root.is_dir():
            raise InputMissingError(f"folder {root} does not exist")
    raws = sorted({p for pattern in _T1W_GLOBS for p in bids.glob(pattern)})
    if not raws:
        raise InputMissingError(f"no T1w image (sub-<label>[/ses-<label>]/anat/*_T1w.nii[.gz]) "
                                f"in {bids}")
    pairs, looked_for = [], []
    for raw in raws:
        source = SourceEntities.from_path(raw)
        preproc = [derivative_path(root, source, space=TEMPLATE_SPACE, res="2", desc="preproc",
                                   suffix="T1w") for root in roots[1:]]
        for t1w in [p for p in preproc if p.is_file()] + [raw]:
            names = _cbv_names(t1w)
            looked_for.append(f"{' or '.join(names)} (for {t1w.name})")
            found = [d / n for d in (source.subject_dir(r) / "anat" for r in roots) for n in names
                     if (d / n).is_file()]
            if found:
                pairs.append(CBVPair(t1w, found[0]))
                break
    if not pairs:
        shown = "; ".join(looked_for[:3]) + (f"; ... ({len(looked_for)} in all)"
                                             if len(looked_for) > 3 else "")
        raise InputMissingError(
            f"no CBV map pairs with any of the {len(raws)} T1w images: looked for {shown} in "
            f"sub-<label>[/ses-<label>]/anat of {', '.join(map(str, roots))}. A CBV map is "
            f"named as its T1w with '_T1w' replaced by '_cbv'")
    return pairs


def normalise_cbv(cbv: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """CBV divided by its median over the brain, zero outside the brain.

    Parameters
    ----------
    cbv : ndarray
    brain : ndarray of bool

    Returns
    -------
    ndarray of float32

    Raises
    ------
    ValueError
        When the brain median is not positive.

    Examples
    --------
    >>> normalise_cbv(np.array([2.0, 4.0, 6.0, 9.0]), np.array([True, True, True, False])).tolist()
    [0.5, 1.0, 1.5, 0.0]
    """
    brain = np.asarray(brain, dtype=bool)
    median = float(np.median(cbv[brain])) if brain.any() else float("nan")
    if not median > 0:
        raise ValueError(f"the CBV brain median is {median}, not a positive value")
    return np.where(brain, np.asarray(cbv, dtype=np.float32) / np.float32(median), 0).astype(np.float32)


def load_pair(pair: CBVPair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised T1w, normalised CBV and brain mask of a pair.

    Parameters
    ----------
    pair : CBVPair

    Returns
    -------
    (ndarray, ndarray, ndarray)
        float32 T1w (top-1 % mean = 1), float32 CBV (brain median = 1), bool brain.

    Raises
    ------
    ImageError
        When an image cannot be read, is not 3D, the grids differ or a normalisation fails.
    """
    import nibabel as nib

    try:
        t1w, cbv = (nib.load(str(p)) for p in (pair.t1w, pair.cbv))
        data = [img.get_fdata(dtype=np.float32) for img in (t1w, cbv)]
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise ImageError(f"cannot read the pair {pair.t1w} / {pair.cbv}: {exc}") from exc
    if data[0].ndim != 3 or data[0].shape != data[1].shape \
            or not np.allclose(t1w.affine, cbv.affine, atol=1e-3):
        raise ImageError(f"{pair.cbv} is not on the 3D grid of {pair.t1w} "
                         f"({data[1].shape} vs {data[0].shape}); register it to the T1w first")
    brain = data[0] != 0
    try:
        return normalise_t1w(data[0], brain), normalise_cbv(data[1], brain), brain
    except ValueError as exc:
        raise ImageError(f"{pair.name}: {exc}") from exc


def sample_patch_corners(brain: np.ndarray, n: int, patch: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Corners of ``n`` cubic patches centred on random brain voxels, shifted to fit the grid.

    Parameters
    ----------
    brain : ndarray of bool
        Brain mask; every side must be >= ``patch``.
    n, patch : int
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of int, shape (n, 3)

    Examples
    --------
    >>> brain = np.zeros((8, 8, 8), bool); brain[7, 0, 3] = True
    >>> sample_patch_corners(brain, 2, 4, np.random.default_rng(0)).tolist()
    [[4, 0, 1], [4, 0, 1]]
    """
    voxels = np.flatnonzero(brain)
    centres = np.stack(np.unravel_index(rng.choice(voxels, size=n), brain.shape), axis=1)
    return np.clip(centres - patch // 2, 0, np.array(brain.shape) - patch)


def _pad_to(data: np.ndarray, patch: int) -> np.ndarray:
    return np.pad(data, [(0, max(0, patch - s)) for s in data.shape])


def _epoch_batches(volumes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *, epoch: int,
                   seed: int, patch: int, batch: int,
                   per_scan: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng([seed, epoch])  # a function of (seed, epoch): resumable
    draws = [(i, corner) for i, (_, _, brain) in enumerate(volumes)
             for corner in sample_patch_corners(brain, per_scan, patch, rng)]
    draws = [draws[j] for j in rng.permutation(len(draws))]
    for first in range(0, len(draws), batch):
        xs, ys = [], []
        for i, corner in draws[first:first + batch]:
            box = tuple(slice(c, c + patch) for c in corner)
            xs.append(volumes[i][0][box])
            ys.append(volumes[i][1][box])
        yield torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])


@dataclass
class CBVTrainResult:
    """What :func:`train_cbv_synthesis` returns."""

    network: CBVSynthNet
    rows: list[dict[str, Any]] = field(default_factory=list)
    weights: Path | None = None


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _save(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".part")
    torch.save(payload, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def train_cbv_synthesis(pairs_or_dataset: str | Path | Sequence[CBVPair], out_dir: str | Path, *,
                        epochs: int = 50, patch: int = 32, batch: int = 4, lr: float = 1e-3,
                        seed: int = 0, device: str = "auto", resume: bool = False,
                        derivatives: Sequence[str | Path] = (), patches_per_scan: int = 16,
                        model: dict[str, Any] | None = None) -> CBVTrainResult:
    """Train :class:`~bidsapp.nets.cbv_synth.CBVSynthNet` on paired T1w / CBV volumes.

    Parameters
    ----------
    pairs_or_dataset : path or sequence of CBVPair
        A BIDS dataset (searched by :func:`find_cbv_pairs` with ``derivatives``) or the pairs.
    out_dir : path
        Receives ``checkpoint_latest.pt``, ``loss.csv`` and, at the end, ``cbv_synth.pt``.
    epochs : int, default 50
        Total epochs (a resumed run counts those already done).
    patch : int, default 32
        Patch side; a multiple of the network's ``patch_multiple``.
    batch : int, default 4
    lr : float, default 1e-3
        Adam learning rate.
    seed : int, default 0
        Seeds the weights and the patch draws.
    device : str, default "auto"
        ``auto``, ``cpu`` or ``cuda[:k]`` (CUDA runs are not bitwise reproducible).
    resume : bool, default False
        Continue from ``out_dir/checkpoint_latest.pt``; without it an existing checkpoint is
        refused rather than overwritten.
    derivatives : sequence of path
        Derivatives folders, when ``pairs_or_dataset`` is a dataset.
    patches_per_scan : int, default 16
        Patches drawn per pair and epoch.
    model : dict, optional
        :class:`CBVSynthNet` arguments; :data:`DEFAULT_MODEL` by default.

    Returns
    -------
    CBVTrainResult
        The trained network, the loss rows and the path of ``cbv_synth.pt``.

    Raises
    ------
    InputMissingError
        No pair found.
    UsageError
        Bad settings, an existing checkpoint without ``resume``, or a checkpoint of other settings.
    """
    for name, value in (("epochs", epochs), ("patch", patch), ("batch", batch),
                        ("patches_per_scan", patches_per_scan)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
    if not lr > 0:
        raise UsageError(f"lr must be positive, got {lr!r}")
    pairs = (find_cbv_pairs(pairs_or_dataset, derivatives)
             if isinstance(pairs_or_dataset, (str, Path)) else list(pairs_or_dataset))
    if not pairs:
        raise InputMissingError("no T1w / CBV pair to train on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    net = CBVSynthNet(**{**DEFAULT_MODEL, **(model or {})})
    if patch % net.patch_multiple:
        raise UsageError(f"patch must be a multiple of {net.patch_multiple} for "
                         f"{len(net.init_args['channels'])} levels, got {patch}")
    net.to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    settings = {"model_args": net.init_args, "seed": seed, "patch": patch, "batch": batch,
                "lr": lr, "patches_per_scan": patches_per_scan,
                "pairs": [p.name for p in pairs]}
    latest, rows, start = out / "checkpoint_latest.pt", [], 0
    if latest.is_file() and not resume:
        raise UsageError(f"{latest} exists: pass resume=True (--resume) or another out_dir")
    if resume and latest.is_file():
        state = torch.load(latest, map_location=dev, weights_only=True)
        differ = [k for k, v in settings.items() if state.get(k) != v]
        if state.get("format") != CBV_CHECKPOINT_FORMAT or differ:
            raise UsageError(f"{latest} was written with other settings ({', '.join(differ)}); "
                             f"resume with the same ones or use another out_dir")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rows, start = list(state["rows"]), int(state["epoch"])
        LOGGER.info("resuming after epoch %d from %s", start, latest)
    volumes = [tuple(_pad_to(a, patch) for a in load_pair(p)) for p in pairs]
    net.train()
    for epoch in range(start, epochs):
        began, losses = time.monotonic(), []
        for x, y in _epoch_batches(volumes, epoch=epoch, seed=seed, patch=patch, batch=batch,
                                   per_scan=patches_per_scan):
            loss = F.l1_loss(net(x.to(dev)), y.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        rows.append({"epoch": epoch + 1, "steps": len(losses), "train_l1": float(np.mean(losses)),
                     "seconds": round(time.monotonic() - began, 3)})
        LOGGER.info("epoch %d/%d: L1 %.4f", epoch + 1, epochs, rows[-1]["train_l1"])
        _save({"format": CBV_CHECKPOINT_FORMAT, **settings, "epoch": epoch + 1,
               "model": net.state_dict(), "optimizer": optimizer.state_dict(), "rows": rows},
              latest)
        _write_csv(out / "loss.csv", rows)
    weights = out / "cbv_synth.pt"
    _save({"format": CBV_CHECKPOINT_FORMAT, **settings, "epoch": len(rows),
           "model": net.state_dict(), "rows": rows,
           "normalisation": {"t1w": "mean of the top 1 % non-zero voxels",
                             "cbv": "brain median"}}, weights)
    return CBVTrainResult(net.eval(), rows, weights)


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field_ = gaussian_filter(rng.normal(size=tuple(shape)), sigma)
    return (field_ - field_.min()) / (np.ptp(field_) + 1e-12)


def _vessels(shape: Sequence[int], rng: np.random.Generator, n: int = 4) -> np.ndarray:
    """Tubes (Gaussian profile, ~1 voxel radius) along random lines through the volume."""
    grid = np.indices(tuple(shape), dtype=np.float64).reshape(3, -1).T
    out = np.zeros(len(grid))
    for _ in range(n):
        point = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        rel = grid - point
        dist2 = (rel ** 2).sum(1) - (rel @ direction) ** 2
        out = np.maximum(out, np.exp(-dist2 / 2.0))
    return out.reshape(tuple(shape))


def make_synthetic_pairs(root: str | Path, n: int = 4, shape: Sequence[int] = (32, 32, 32),
                         seed: int = 0) -> Path:
    """Write a small BIDS dataset of skull-stripped T1w images with CBV maps (for tests).

    Each brain is an ellipsoid (zero outside) with a smooth tissue field ``t`` in [0, 1]:
    ``T1w = 200 + 600 t`` (+ 8 % in vessels, + noise) and ``CBV = 1 + 3 exp(-((t - 0.35) /
    0.15)^2) + 4 vessel`` (grey-matter-like intensities have the highest blood volume), i.e. a
    smooth nonlinear function of the T1w plus a vessel pattern of tubes along random lines.

    Parameters
    ----------
    root : path
        Folder to create the dataset in (``root`` itself is the BIDS root).
    n : int, default 4
        Participants ``sub-s000`` ... with ``anat/sub-<l>_T1w.nii.gz`` and ``anat/sub-<l>_cbv.nii.gz``.
    shape : sequence of int, default (32, 32, 32)
    seed : int, default 0

    Returns
    -------
    Path
        The BIDS root.
    """
    import json

    import nibabel as nib

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic T1w / CBV pairs", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-s{i:03d}\n" for i in range(n)))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = np.indices(tuple(shape), dtype=np.float64)
    centre = (np.array(shape) - 1) / 2
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        radius = np.array(shape) * rng.uniform(0.38, 0.45, 3)
        brain = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
        tissue, vessel = _smooth_field(shape, rng, 2.0), _vessels(shape, rng)
        t1w = (200 + 600 * tissue) * (1 + 0.08 * vessel) + rng.normal(0, 5, tuple(shape))
        cbv = 1 + 3 * np.exp(-((tissue - 0.35) / 0.15) ** 2) + 4 * vessel
        anat = root / f"sub-s{i:03d}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for data, suffix in ((t1w, "T1w"), (cbv, "cbv")):
            nib.Nifti1Image(np.where(brain, data, 0).astype(np.float32), affine).to_filename(
                anat / f"sub-s{i:03d}_{suffix}.nii.gz")
    return root


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m training.cbv_synth`` (builds, never parses)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.cbv_synth",
        description="Train the T1w -> CBV synthesis network on paired scans: each "
                    "<entities>_T1w.nii[.gz] (or its space-MNI152NLin2009aSym_res-2_desc-preproc "
                    "derivative) with <entities>_cbv.nii[.gz] on the same grid.")
    parser.add_argument("--config", type=Path, help="TOML file whose keys are these options "
                        "(underscores for dashes); options given here win")
    parser.add_argument("--bids", type=Path, help="BIDS dataset")
    parser.add_argument("--derivatives", type=Path, action="append", help="derivatives folder "
                        "(repeatable)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--patch", type=int, help="patch side in voxels")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto, cpu or cuda[:k]")
    parser.add_argument("--patches-per-scan", type=int)
    parser.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")],
                        help="widths of the levels, e.g. 16,32,64")
    parser.add_argument("--ssm-blocks", type=int, help="state-space blocks in the bottleneck")
    parser.add_argument("--d-state", type=int, help="state size of the selective scans")
    parser.add_argument("--scan-paths", type=int, help="scan paths per block (1-6)")
    parser.add_argument("--resume", action="store_true", default=None,
                        help="continue from out/checkpoint_latest.pt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or that of the typed error)."""
    import tomllib

    from bidsapp.cli.run import exit_code_for
    from bidsapp.errors import BrainageError

    args = vars(build_parser().parse_args(argv))
    config = args.pop("config")
    options: dict[str, Any] = {}
    if config:
        with open(config, "rb") as handle:
            options = tomllib.load(handle)
    options.update({k: v for k, v in args.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    model = {k: options.pop(k) for k in _MODEL_KEYS if k in options}
    try:
        unknown = sorted(set(options) - set(args))
        if unknown:
            raise UsageError(f"unknown option(s) in {config}: {', '.join(unknown)}")
        if "bids" not in options or "out" not in options:
            raise UsageError("--bids and --out are required (on the command line or in --config)")
        result = train_cbv_synthesis(Path(options.pop("bids")), Path(options.pop("out")),
                                     derivatives=options.pop("derivatives", ()), model=model,
                                     **options)
    except BrainageError as exc:
        LOGGER.error("%s", exc)
        return exit_code_for(exc)
    LOGGER.info("weights: %s", result.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
