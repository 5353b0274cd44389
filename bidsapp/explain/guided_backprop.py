"""Guided backpropagation maps (MONAI's implementation) and their way back to image grids.

:class:`monai.visualize.GuidedBackpropGrad` swaps every sub-module whose name contains
``relu`` for a guided ReLU while it runs.  The seed network's LeakyReLU(0.01) modules keep
MONAI's names, so they are guided too; during the explanation they therefore act as plain
ReLUs (the usual definition of guided backpropagation, which passes only positive signals).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

__all__ = ["guided_backprop", "map_to_grid", "warp_to_template"]

LOGGER = logging.getLogger("brainage.explain")


def guided_backprop(network: nn.Module, x: torch.Tensor | np.ndarray, *, output_index: int = 0,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """Guided-backpropagation gradient of one output with respect to the input.

    Parameters
    ----------
    network : nn.Module
        Maps ``(1, C, *spatial)`` to ``(1, n_outputs)``.
    x : tensor or ndarray
        One input, shape ``spatial`` or ``(C, *spatial)`` or ``(1, C, *spatial)``.
    output_index : int
        Which output to explain (0 for brain age).
    device : str or torch.device

    Returns
    -------
    ndarray
        Signed gradient with the spatial shape of ``x`` (summed over channels).
    """
    from monai.visualize import GuidedBackpropGrad

    tensor = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
    while tensor.ndim < 5:
        tensor = tensor[None]
    if tensor.shape[0] != 1:
        raise ValueError(f"x must hold one input, got batch size {tensor.shape[0]}")
    tensor = tensor.detach().float().to(device).clone()
    was_training = network.training
    try:
        grad = GuidedBackpropGrad(network)(tensor, index=output_index)
    finally:
        network.train(was_training)
    return grad.detach().cpu().numpy()[0].sum(axis=0)


def map_to_grid(values: np.ndarray, values_affine: np.ndarray, shape: tuple[int, ...],
                affine: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample a map given on one grid onto another (world coordinates; 0 outside).

    Parameters
    ----------
    values : ndarray, 3D
        Map on its grid.
    values_affine : ndarray (4, 4)
        Voxel-to-world affine of ``values``.
    shape : tuple
        Target grid shape.
    affine : ndarray (4, 4)
        Voxel-to-world affine of the target grid.
    order : int
        Spline order.
    """
    if values.ndim != 3 or len(shape) != 3:
        raise ValueError("map_to_grid works on 3D maps and grids")
    mapping = np.linalg.inv(np.asarray(values_affine, dtype=float)) @ np.asarray(affine, dtype=float)
    return ndimage.affine_transform(np.asarray(values, dtype=np.float32), mapping[:3, :3],
                                    offset=mapping[:3, 3], output_shape=tuple(shape), order=order,
                                    mode="constant", cval=0.0)


def warp_to_template(map_file: str | Path, xfm_file: str | Path, reference_file: str | Path,
                     out_file: str | Path) -> Path:
    """Warp a map from T1w space to template space with the saved ANTs transform.

    Parameters
    ----------
    map_file : path
        Map in the T1w grid (NIfTI).
    xfm_file : path
        ``*_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5`` of the participant level.
    reference_file : path
        Image defining the template grid (e.g. the 2 mm MNI-space T1w of the same participant).
    out_file : path
        Output NIfTI.

    Returns
    -------
    Path
    """
    import ants

    for name, path in (("map_file", map_file), ("xfm_file", xfm_file),
                       ("reference_file", reference_file)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} {path} does not exist")
    warped = ants.apply_transforms(fixed=ants.image_read(str(reference_file)),
                                   moving=ants.image_read(str(map_file)),
                                   transformlist=[str(xfm_file)], interpolator="linear")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    ants.image_write(warped, str(out_file))
    return out_file
