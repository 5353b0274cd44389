"""Grad-CAM of the seed-003 VGG8: MONAI's map equals a hand-made one, it sits where the signal
is, and the paper's top-20 % maps keep exactly the top fifth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bidsapp.explain.gradcam import VGGGradCAM, gradcam_map, max_area_slices, top_fraction_map
from bidsapp.nets import VGG8


def _manual_gradcam(net: VGG8, x: torch.Tensor) -> np.ndarray:
    """ReLU(sum_c mean(dy/dA_c) * A_c) at the last conv block, trilinear to the input grid."""
    net.eval()
    store = {}
    layer = dict(net.named_modules())[net.gradcam_layer]
    handle = layer.register_forward_hook(lambda module, inputs, output: store.setdefault("a", output))
    try:
        out = net(x)
        act = store["a"]
        (grad,) = torch.autograd.grad(out[:, 0].sum(), act)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0].detach().numpy()


def test_monai_gradcam_equals_the_manual_computation():
    torch.manual_seed(3)
    net = VGG8(3, in_shape=(32, 48, 32), channels=(4, 4, 8, 8, 8), dense_units=(8, 8))
    x = torch.rand(2, 1, 32, 48, 32)
    expected = _manual_gradcam(net, x)
    if expected.max() == 0:  # every weighted sum negative: explain the negated output instead
        with torch.no_grad():
            net.head.out.weight.neg_()
        expected = _manual_gradcam(net, x)
    assert expected.max() > 0
    got = VGGGradCAM(net)(x)
    assert got.shape == (2, 32, 48, 32)
    np.testing.assert_allclose(got, expected, atol=1e-5 * expected.max(), rtol=1e-5)
    # the caller's network carries no hooks (the explainer works on a copy)
    layer = dict(net.named_modules())[net.gradcam_layer]
    assert not layer._forward_hooks and not layer._backward_hooks
    np.testing.assert_allclose(gradcam_map(net, x[:1]), got[:1], rtol=1e-5, atol=1e-7)


def _monotone_net() -> VGG8:
    """Two blocks, positive weights, zero biases: zero input regions give zero activations, and
    every gradient is >= 0, so the Grad-CAM weights are positive."""
    torch.manual_seed(0)
    net = VGG8(3, in_shape=(32, 32, 32), channels=(4, 4), dense_units=(8,))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                module.weight.abs_()
                module.bias.zero_()
    return net.eval()


def test_map_concentrates_where_the_signal_is():
    net = _monotone_net()
    x = torch.zeros(1, 1, 32, 32, 32)
    x[..., :12, :, :] = torch.rand(1, 1, 12, 32, 32) + 0.5  # signal only at low x
    cam = VGGGradCAM(net)(x)[0]
    assert cam.max() > 0
    # the last block sees 2 x 2 input voxels per feature voxel and 3 feature voxels per conv,
    # so no activation reaches beyond x = 12 + 6; trilinear upsampling spreads it by one more
    assert cam[20:].max() == 0
    assert cam[:12].sum() / cam.sum() > 0.85 and cam[:16].sum() / cam.sum() > 0.97
    top = top_fraction_map(cam, 0.2)
    assert top[:16].sum() == pytest.approx(top.sum())
    assert max_area_slices(top)[0] < 16


def test_top_fraction_keeps_the_top_fifth():
    values = np.random.default_rng(0).permutation(np.arange(1.0, 1001.0)).reshape(10, 10, 10)
    top = top_fraction_map(values, 0.2)
    kept = values[top > 0]
    assert kept.size == 200 and kept.min() == 801.0
    np.testing.assert_array_equal(top[top > 0], values[top > 0])  # values, not a binary mask
    mask = values > 500  # within a mask of 500 voxels: the top 100
    assert (top_fraction_map(values, 0.2, mask) > 0).sum() == 100
    assert not top_fraction_map(np.zeros((4, 4, 4)), 0.2).any()
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_map(values, 0.0)


def test_target_layer_is_checked():
    with pytest.raises(ValueError, match="no module named"):
        VGGGradCAM(_monotone_net(), target_layer="features.block9.conv")
    with pytest.raises(ValueError, match="target_layer is required"):
        VGGGradCAM(nn.Sequential(nn.Conv3d(1, 1, 3)))
