"""Synthetic participant outputs for group-level tests (shared by tests/test_group.py).

Writes, under the participant-level names, modulated GM maps with a planted GM loss in
group PT, brain masks, ``*_brainage.tsv`` rows with a planted brain-PAD offset, voxel
brain-age maps with a planted regional offset, and repeated sessions for ICC.
"""

from __future__ import annotations

import numpy as np
import nibabel as nib
from scipy import ndimage

SPACE = "MNI152NLin2009aSym"
SHAPE = (20, 24, 20)
# 2 mm grid over the centre of MNI space (thalamus, striatum, hippocampi)
AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -30], [0, 0, 2.0, -14], [0, 0, 0, 1]])
BLOB_CENTRE = (6, 12, 10)
BLOB_RADIUS = 3.0


def blob_mask():
    ijk = np.indices(SHAPE)
    return np.sum((ijk - np.array(BLOB_CENTRE)[:, None, None, None]) ** 2, axis=0) <= BLOB_RADIUS**2


def _noise(rng, sd):
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.5)
    return field / field.std() * sd


def make_dataset(root, *, n_per_group=12, gm_effect=0.08, pad_effect=4.0, map_effect=6.0,
                 n_repeat=4, seed=0, with_models=True):
    """Create ``root/bids`` and ``root/out``; returns (bids_dir, output_dir)."""
    rng = np.random.default_rng(seed)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    out.mkdir(parents=True)
    n = 2 * n_per_group
    groups = np.array(["HC", "PT"] * n_per_group)
    ages = np.round(rng.uniform(25, 80, n), 1)
    sexes = np.array(["F", "M"])[rng.integers(0, 2, n)]
    lines = ["participant_id\tage\tsex\tgroup\tsurvival"]
    for i in range(n):
        lines.append(f"sub-{i:02d}\t{ages[i]}\t{sexes[i]}\t{groups[i]}\t{rng.uniform(10, 60):.1f}")
    (bids / "participants.tsv").write_text("\n".join(lines) + "\n")
    (bids / "participants.json").write_text('{"age": {"Units": "years"}}')
    blob = blob_mask()
    mask = np.ones(SHAPE, dtype=np.uint8)
    for i in range(n):
        sessions = ["A", "B"] if i < n_repeat else [None]
        gm_subject = 0.5 + _noise(rng, 0.04) - (gm_effect * blob if groups[i] == "PT" else 0)
        bias = 0.4 * (52.0 - ages[i])  # regression towards the training mean
        pad_i = bias + rng.normal(0, 3) + (pad_effect if groups[i] == "PT" else 0)
        if len(sessions) > 1:
            (bids / f"sub-{i:02d}").mkdir()
            (bids / f"sub-{i:02d}" / f"sub-{i:02d}_sessions.tsv").write_text(
                "session_id\tage\nses-A\t%s\nses-B\t%s\n" % (ages[i], ages[i]))
        for ses in sessions:
            prefix = f"sub-{i:02d}" + (f"_ses-{ses}" if ses else "")
            anat = out / f"sub-{i:02d}" / (f"ses-{ses}" if ses else "") / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            gm = gm_subject + (_noise(rng, 0.01) if ses else 0)
            nib.save(nib.Nifti1Image(gm.astype(np.float32), AFFINE),
                     anat / f"{prefix}_space-{SPACE}_res-2_label-GM_desc-modulated_probseg.nii.gz")
            nib.save(nib.Nifti1Image(mask, AFFINE), anat / f"{prefix}_space-{SPACE}_res-2_desc-brain_mask.nii.gz")
            if not with_models:
                continue
            scan_pad = pad_i + (rng.normal(0, 0.5) if ses else 0)
            rows = ["model\tbrain_age\tbrain_age_lower\tbrain_age_upper\tage\tbrain_pad"]
            for model, extra in (("alpha", 0.0), ("beta", rng.normal(0, 2))):
                ba = ages[i] + scan_pad + extra
                rows.append(f"{model}\t{ba:.3f}\tn/a\tn/a\t{ages[i]}\t{ba - ages[i]:.3f}")
            (anat / f"{prefix}_brainage.tsv").write_text("\n".join(rows) + "\n")
            local = ages[i] + bias + _noise(rng, 2.0) + (map_effect * blob if groups[i] == "PT" else 0)
            nib.save(nib.Nifti1Image(local.astype(np.float32), AFFINE),
                     anat / f"{prefix}_space-{SPACE}_res-2_desc-alpha_brainagemap.nii.gz")
    return bids, out
