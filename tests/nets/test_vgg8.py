"""The seed-003 VGG8: shapes, the paper's layers, parameter count by hand, output scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bidsapp.nets import VGG8, VGG8_CHANNELS, vgg8_feature_shape

TINY = dict(channels=(2, 2, 2, 2, 2), dense_units=(4, 4))
CASES = [  # (constructor kwargs, input shape, expected output shape, expected feature shape)
    (dict(spatial_dims=3, in_shape=(40, 48, 40), **TINY), (2, 1, 40, 48, 40), (2, 1), (1, 1, 1)),
    (dict(spatial_dims=3, in_shape=(64, 35, 33), in_channels=2, **TINY), (1, 2, 64, 35, 33), (1, 1), (2, 1, 1)),
    (dict(spatial_dims=2, in_shape=(96, 64), out_channels=3, **TINY), (3, 1, 96, 64), (3, 3), (3, 2)),
]


@pytest.mark.parametrize("kwargs, shape, expected, features", CASES)
def test_output_and_feature_shapes(kwargs, shape, expected, features):
    net = VGG8(**kwargs).eval()
    with torch.no_grad():
        assert tuple(net(torch.rand(shape)).shape) == expected
        assert tuple(net.features(torch.rand(shape)).shape[2:]) == features
    assert net.feature_shape == features == vgg8_feature_shape(kwargs["in_shape"])


def test_paper_layers_and_parameter_count_by_hand():
    net = VGG8(3, in_shape=(80, 96, 80))
    convs = [m for m in net.features.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == list(VGG8_CHANNELS) == [16, 32, 64, 128, 256]
    assert all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == 5
    pools = [m for m in net.features.modules() if isinstance(m, nn.MaxPool3d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    # conv-BN-ReLU-pool order inside each block
    kinds = [type(m).__name__ for m in net.features.block0.modules()
             if isinstance(m, (nn.Conv3d, nn.BatchNorm3d, nn.ReLU, nn.MaxPool3d))]
    assert kinds == ["Conv3d", "BatchNorm3d", "ReLU", "MaxPool3d"]
    dense = [m for m in net.head if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(256 * 2 * 3 * 2, 512), (512, 128), (128, 1)]
    # by hand: conv weights 27 * c_in * c_out + biases, BN weight + bias, then the dense layers
    chans = [1, 16, 32, 64, 128, 256]
    conv = sum(27 * a * b + b for a, b in zip(chans, chans[1:]))
    bn = sum(2 * c for c in chans[1:])
    head = (3072 * 512 + 512) + (512 * 128 + 128) + (128 + 1)
    assert sum(p.numel() for p in net.parameters()) == conv + bn + head == 2_816_129


def test_target_scaling_is_saved_with_the_weights(tmp_path):
    torch.manual_seed(0)
    net = VGG8(3, in_shape=(32, 32, 32), **TINY).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    net.set_target_scaling(45.0, 12.5)
    state = net.state_dict()
    assert (float(state["target_offset"]), float(state["target_scale"])) == (45.0, 12.5)
    torch.save(state, tmp_path / "vgg8.pt")
    other = VGG8(3, in_shape=(32, 32, 32), **TINY).eval()
    other.load_state_dict(torch.load(tmp_path / "vgg8.pt", weights_only=True))
    with torch.no_grad():  # prediction = offset + scale * head output
        torch.testing.assert_close(other(x), 45.0 + 12.5 * net.forward_normalised(x))
    with pytest.raises(ValueError, match="scale"):
        net.set_target_scaling(0.0, 0.0)


def test_dropout_and_gradcam_layer():
    net = VGG8(3, in_shape=(32, 32, 32), dropout=0.3, **TINY)
    assert [m.p for m in net.head if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert VGG8(3, in_shape=(32, 32, 32), **TINY).head.drop0.p == 0.0  # the paper: none
    assert dict(net.named_modules())[net.gradcam_layer] is net.features.block4.conv


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(in_shape=(31, 40, 40)), ValueError, ">= 32"),
    (dict(in_shape=(40, 40)), ValueError, "3 sides"),
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(channels=(16, 32.0)), TypeError, "channels"),
    (dict(spatial_dims=1), ValueError, "spatial_dims"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        VGG8(**{"in_shape": (32, 32, 32), **kwargs})
