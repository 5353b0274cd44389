"""Grad-CAM maps of the seed-003 VGG8 (MONAI's implementation) and the paper's top-20 % maps.

Jomsky et al. explain each encoder with Grad-CAM on the last convolution block: the block's
activations ``A_c`` weighted by the spatial mean of the output's gradient with respect to them,
``ReLU(sum_c mean(dy/dA_c) * A_c)``, upsampled (trilinear) to the input grid.  The output is a
regression (the predicted age), so the map shows where activations push the predicted age
*up*.  The paper then keeps "the top 20 % of gradient values" of each map
(:func:`top_fraction_map`: voxels at or above the map's 80th percentile keep their value, the
rest become 0), averages those maps per 10-year age group, and shows, per view, the slice with
the largest area of non-zero values (:func:`max_area_slices`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["VGGGradCAM", "gradcam_map", "top_fraction_map", "max_area_slices"]


class VGGGradCAM:
    """Grad-CAM of a regression network, on its own copy of the network.

    MONAI's :class:`~monai.visualize.GradCAM` registers forward and backward hooks on the
    target layer and never removes them; the explainer therefore works on a deep copy (in eval
    mode), so the caller's network is left without hooks.  Build one explainer per network
    and reuse it.

    Parameters
    ----------
    network : nn.Module
        Maps ``(B, C, *spatial)`` to ``(B, n_outputs)``; a :class:`bidsapp.nets.VGG8` by default
        names its target layer itself (``gradcam_layer``).
    target_layer : str, optional
        Name of the explained module (default: ``network.gradcam_layer``).
    output_index : int
        Which output to explain (0: the brain age).
    """

    def __init__(self, network: nn.Module, target_layer: str | None = None,
                 output_index: int = 0) -> None:
        from monai.visualize import GradCAM

        layer = target_layer or getattr(network, "gradcam_layer", None)
        if not layer:
            raise ValueError("target_layer is required for a network without a gradcam_layer")
        if layer not in dict(network.named_modules()):
            raise ValueError(f"the network has no module named {layer!r}")
        self.network = copy.deepcopy(network).eval()
        self.target_layer, self.output_index = layer, int(output_index)
        # raw maps (MONAI's default min-max normalisation would hide differences between scans)
        self._cam = GradCAM(self.network, target_layers=layer, postprocessing=lambda m: m)

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Grad-CAM maps on the input grid, shape ``(B, *spatial)`` (non-negative)."""
        tensor = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
        while tensor.ndim < 2 + getattr(self.network, "spatial_dims", 3):
            tensor = tensor[None]
        device = next(self.network.parameters()).device
        cam = self._cam(tensor.detach().float().to(device), class_idx=self.output_index)
        return cam.detach().cpu().numpy()[:, 0]


def gradcam_map(network: nn.Module, x: torch.Tensor | np.ndarray,
                target_layer: str | None = None) -> np.ndarray:
    """One-off Grad-CAM maps of ``x`` (see :class:`VGGGradCAM`; prefer it for many scans)."""
    return VGGGradCAM(network, target_layer)(x)


def top_fraction_map(cam: np.ndarray, fraction: float = 0.2,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """Keep the top ``fraction`` of a map's values (within ``mask``), zero the rest.

    The threshold is the ``ceil(fraction * n)``-th largest value of the ``n`` voxels considered;
    voxels equal to it are kept too.  An all-zero map stays all zero.

    Examples
    --------
    >>> top_fraction_map(np.arange(10.0), 0.2).tolist()
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0, 9.0]
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    cam = np.asarray(cam, dtype=np.float32)
    inside = np.ones(cam.shape, bool) if mask is None else np.asarray(mask, bool)
    if inside.shape != cam.shape:
        raise ValueError(f"mask has shape {inside.shape}, the map {cam.shape}")
    values = cam[inside]
    if values.size == 0:
        return np.zeros_like(cam)
    k = max(1, int(np.ceil(fraction * values.size - 1e-9)))
    threshold = np.partition(values, values.size - k)[values.size - k]
    return np.where(inside & (cam >= threshold) & (cam > 0), cam, 0.0).astype(np.float32)


def max_area_slices(cam: np.ndarray) -> tuple[int, ...]:
    """Per axis, the slice with the most non-zero voxels (the paper's displayed slices).

    Examples
    --------
    >>> m = np.zeros((4, 4, 4)); m[1, :, 2] = 1; m[1, 0, :] = 1
    >>> max_area_slices(m)
    (1, 0, 2)
    """
    nonzero = np.asarray(cam) != 0
    return tuple(int(np.argmax(nonzero.sum(axis=tuple(a for a in range(nonzero.ndim) if a != axis))))
                 for axis in range(nonzero.ndim))
