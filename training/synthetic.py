"""A small synthetic BIDS dataset with ``brainage``-style derivatives and a planted age effect.

For tests and demonstrations of the training engine without real scans: each "brain" is a
bright ellipsoid whose size shrinks and whose dark central "ventricles" grow with age, so a
model can learn age from the image and a broken pipeline cannot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["synthetic_brain", "synthetic_mni_brain", "synthetic_modulated_maps",
           "make_synthetic_dataset"]


def synthetic_brain(age: float, shape: Sequence[int] = (32, 40, 32), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """T1w-like volume and brain mask of an age (years, 20-90 is the useful range).

    Returns
    -------
    (ndarray, ndarray)
        float32 image (head with background noise) and uint8 brain mask.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2 + rng.normal(0, 1.0, 3)
    rel = (age - 20.0) / 70.0
    brain_r = np.array(shape) * (0.36 - 0.05 * rel)
    vent_r = np.array(shape) * (0.05 + 0.10 * rel)
    head_r = np.array(shape) * 0.46

    def inside(radius):
        return (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1

    brain, vent, head = inside(brain_r), inside(vent_r), inside(head_r)
    image = np.where(head, 150.0, 5.0) + rng.normal(0, 8, shape)
    image[brain] = 500 + rng.normal(0, 20, int(brain.sum()))
    image[vent] = 180 + rng.normal(0, 10, int(vent.sum()))
    return np.clip(image, 0, None).astype(np.float32), brain.astype(np.uint8)


def synthetic_mni_brain(age: float, seed: int = 0) -> np.ndarray:
    """A brain-masked "MNI-space T1w" of an age on the 2 mm template grid (99 x 117 x 95).

    Built from the bundled template's tissue priors: grey matter darkens and CSF spaces take
    over with age (in cortex, deep grey matter and cerebellum alike), plus smooth individual
    intensity bias and noise.  Only for tests of the MNI-space model families.
    """
    from bidsapp.templates import get_template

    rng = np.random.default_rng(seed)
    tpl = get_template(2.0)
    mask = np.asarray(tpl.mask.dataobj) > 0
    gm, wm, csf = (img.get_fdata(dtype=np.float32) for img in tpl.tpms)
    rel = (age - 20.0) / 70.0
    image = 420 * wm + (300 - 90 * rel) * gm + (60 + 40 * rel) * csf
    # a smooth individual intensity bias: a random linear ramp of up to +-5 % across the brain
    ramp = sum(rng.normal(0, 1) * np.linspace(-1, 1, n).reshape([-1 if a == i else 1 for a in range(3)])
               for i, n in enumerate(mask.shape))
    image *= 1 + 0.05 * ramp / 3
    image += rng.normal(0, 6, mask.shape).astype(np.float32)
    return np.where(mask, np.clip(image, 1, None), 0).astype(np.float32)


def synthetic_modulated_maps(age: float, resolution_mm: float = 2.0,
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Modulated GM and WM maps of an age on a template grid (2 or 1.5 mm).

    From the bundled template's priors: tissue loses volume with age, grey matter most in the
    front of the brain (over 70 years 50 % at the frontal pole, 25 % at the occipital pole),
    white matter 25 % everywhere; plus an individual head-size factor (SD 4 %) and voxel noise.
    The tissue density of every voxel thus falls with age (a cue a small convolutional network
    finds locally), and a local model can learn where the effect is strongest.  Only for tests
    of the local-unet family.
    """
    from bidsapp.templates import get_template

    rng = np.random.default_rng(seed)
    tpl = get_template(resolution_mm)
    mask = np.asarray(tpl.mask.dataobj) > 0
    gm, wm = (img.get_fdata(dtype=np.float32) for img in (tpl.gm, tpl.wm))
    rel = (age - 20.0) / 70.0
    # anterior-posterior position in 0 (back) .. 1 (front) along the second (A-P) axis
    front = np.linspace(0.0, 1.0, mask.shape[1], dtype=np.float32)[None, :, None]
    size = 1.0 + rng.normal(0, 0.04)
    gm_mod = gm * (1.0 - rel * (0.25 + 0.25 * front)) * size
    wm_mod = wm * (1.0 - 0.25 * rel) * size
    out = []
    for data in (gm_mod, wm_mod):
        noisy = data + rng.normal(0, 0.03, mask.shape).astype(np.float32) * (data > 0.01)
        out.append(np.where(mask, np.clip(noisy, 0, None), 0).astype(np.float32))
    return out[0], out[1]


def make_synthetic_dataset(root: str | Path, ages: Sequence[float], *, shape: Sequence[int] = (32, 40, 32),
                           zooms: Sequence[float] = (2.0, 2.0, 2.0), seed: int = 0,
                           mni: bool = False, modulated: bool = False) -> tuple[Path, Path]:
    """Write ``root/bids`` (raw) and ``root/derivatives`` (preproc T1w + brain mask).

    Parameters
    ----------
    root : path
        Output folder (created).
    ages : sequence of float
        One participant per age (labels ``s000``, ``s001`` ...).
    shape, zooms : sequence
        Image grid (RAS, voxel sizes in mm).
    seed : int
    mni : bool
        Also write ``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w`` (:func:`synthetic_mni_brain`).
    modulated : bool
        Also write ``space-MNI152NLin2009aSym_res-2_label-{GM,WM}_desc-modulated_probseg``
        (:func:`synthetic_modulated_maps`).

    Returns
    -------
    (Path, Path)
        The BIDS root and the derivatives root.
    """
    import nibabel as nib

    from bidsapp.derivatives import SourceEntities, derivative_path

    root = Path(root)
    bids, derivs = root / "bids", root / "derivatives"
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic brains", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (bids / "README").write_text("Synthetic brains with a planted age effect.\n")
    (bids / "participants.json").write_text(json.dumps(
        {"age": {"Description": "age at scan", "Units": "year"}, "sex": {"Description": "sex"}}))
    rows = ["participant_id\tage\tsex"]
    affine = np.diag([*map(float, zooms), 1.0])
    affine[:3, 3] = -np.array(shape) * np.array(zooms) / 2
    for i, age in enumerate(ages):
        label = f"s{i:03d}"
        rows.append(f"sub-{label}\t{age:.2f}\t{'FM'[i % 2]}")
        image, mask = synthetic_brain(age, shape, seed=seed * 10007 + i)
        raw = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        raw.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(image, affine).to_filename(raw)
        source = SourceEntities(subject=label)
        t1w = derivative_path(derivs, source, desc="preproc", suffix="T1w")
        t1w.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(image, affine).to_filename(t1w)
        nib.Nifti1Image(mask, affine).to_filename(derivative_path(derivs, source, desc="brain",
                                                                  suffix="mask"))
        if mni:
            from bidsapp.templates import TEMPLATE_SPACE, get_template

            img = nib.Nifti1Image(synthetic_mni_brain(age, seed=seed * 10007 + i),
                                  get_template(2.0).affine)
            img.set_data_dtype(np.int16)  # rounded to int16: small files
            img.to_filename(derivative_path(derivs, source, space=TEMPLATE_SPACE, res="2",
                                            desc="preproc", suffix="T1w"))
        if modulated:
            from bidsapp.templates import TEMPLATE_SPACE, get_template

            maps = synthetic_modulated_maps(age, 2.0, seed=seed * 10007 + i)
            for tissue, data in zip(("GM", "WM"), maps):
                nib.Nifti1Image(data, get_template(2.0).affine).to_filename(derivative_path(
                    derivs, source, space=TEMPLATE_SPACE, res="2", label=tissue,
                    desc="modulated", suffix="probseg"))
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    return bids, derivs
