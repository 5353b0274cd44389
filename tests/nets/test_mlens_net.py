"""The seed-002 MLens base CNN: shapes, parameter count, activations, output bias, dropout."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from bidsapp.nets import MLENS_LEAKY_RELU, MLENS_RELU, MLensCNN, mlens_feature_shape

CASES = [  # (constructor kwargs, input shape, expected output shape, expected feature shape)
    (dict(spatial_dims=3, in_shape=(40, 48, 40)), (2, 1, 40, 48, 40), (2, 1), (2, 2, 2)),
    (dict(spatial_dims=3, in_shape=(77, 94, 80)), (1, 1, 77, 94, 80), (1, 1), (3, 3, 3)),
    (dict(spatial_dims=2, in_shape=(48, 48), act=MLENS_RELU), (3, 1, 48, 48), (3, 1), (2, 2)),
    (dict(spatial_dims=2, in_shape=(33, 17), in_channels=2, out_channels=3), (1, 2, 33, 17), (1, 3), (2, 1)),
]


@pytest.mark.parametrize("kwargs, shape, expected, features", CASES)
def test_output_and_feature_shapes(kwargs, shape, expected, features):
    net = MLensCNN(**kwargs).eval()
    with torch.no_grad():
        assert tuple(net(torch.rand(shape)).shape) == expected
        assert tuple(net.features(torch.rand(shape)).shape[2:]) == features
    assert net.feature_shape == features == mlens_feature_shape(kwargs["in_shape"])


def test_paper_architecture_and_parameter_count():
    net = MLensCNN(3, in_shape=(77, 94, 80))
    convs = [m for m in net.features if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 64, 32]
    assert [c.kernel_size for c in convs] == [(3, 3, 3)] * 4 + [(1, 1, 1)]
    pools = [m for m in net.features if isinstance(m, nn.MaxPool3d)]
    assert len(pools) == 5 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 6 and all(a.negative_slope == pytest.approx(0.2) for a in acts)
    assert net.head.dropout.p == 0.5 and net.head.dense.out_features == 64
    # conv weights + biases, then dense (32 * 3^3 -> 64) and output (64 -> 1), by hand
    conv = (27 * 1 * 16 + 16) + (27 * 16 * 16 + 16) + (27 * 16 * 32 + 32) + (27 * 32 * 64 + 64) \
        + (64 * 32 + 32)
    head = (32 * 27 * 64 + 64) + (64 + 1)
    assert sum(p.numel() for p in net.parameters()) == conv + head == 134_097


def test_relu_variant_has_no_leaky_units():
    net = MLensCNN(3, in_shape=(24, 24, 24), act=MLENS_RELU)
    assert not any(isinstance(m, nn.LeakyReLU) for m in net.modules())
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 6


def test_output_bias_is_the_training_mean_and_other_biases_start_at_zero():
    net = MLensCNN(3, in_shape=(24, 24, 24), output_bias=57.32).eval()
    assert float(net.output_layer.bias.detach()) == pytest.approx(57.32)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in net.modules()
               if isinstance(m, (nn.Conv3d, nn.Linear)) and m is not net.output_layer)
    with torch.no_grad():  # an all-zero input reaches the output bias exactly (zero biases)
        assert float(net(torch.zeros(1, 1, 24, 24, 24))) == pytest.approx(57.32)
    net.set_target_scaling(44.0, 16.0)  # the training engine's hook: the bias, no scale
    assert float(net.output_layer.bias.detach()) == pytest.approx(44.0) and not hasattr(net, "target_scale")


def test_glorot_uniform_initialisation():
    torch.manual_seed(0)
    net = MLensCNN(3, in_shape=(24, 24, 24))
    w = net.features.conv3.weight.detach()
    fan_in, fan_out = 32 * 27, 64 * 27
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    assert float(w.abs().max()) <= bound
    assert float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    net = MLensCNN(2, in_shape=(32, 32), output_bias=0.0)
    x = torch.rand(4, 1, 32, 32) * 255
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
        net.train()
        assert not torch.allclose(net(x), net(x))


def test_state_dict_round_trip():
    net = MLensCNN(3, in_shape=(20, 24, 20), act=MLENS_LEAKY_RELU, output_bias=40.0).eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    other = MLensCNN(3, in_shape=(20, 24, 20)).eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.rand(1, 1, 20, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(net(x), other(x))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(spatial_dims=1, in_shape=(8,)), ValueError, "spatial_dims"),
    (dict(in_shape=(8, 8)), ValueError, "in_shape must have 3"),
    (dict(kernel_sizes=(3, 3, 2, 3, 1)), ValueError, "odd"),
    (dict(filters=(16, 16)), ValueError, "equal length"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(act=("relu", {"inplace": True})), ValueError, "in-place"),
    (dict(dense_units=True), TypeError, "dense_units"),
])
def test_invalid_arguments(kwargs, error, match):
    params = dict(spatial_dims=3, in_shape=(16, 16, 16))
    params.update(kwargs)
    with pytest.raises(error, match=match):
        MLensCNN(**params)
