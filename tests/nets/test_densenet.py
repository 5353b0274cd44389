"""The seed-004 DenseNet regressor (MONAI blocks, last transition removed, LeakyReLU, He init)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from bidsapp.nets import DenseNetRegressor, densenet169_regressor

TINY = dict(init_features=8, growth_rate=4, block_config=(2, 2, 2))
CASES = [  # (constructor kwargs, input shape, expected output shape)
    (dict(spatial_dims=3, **TINY), (2, 1, 32, 32, 16), (2, 1)),
    (dict(spatial_dims=3, out_channels=3, **TINY), (1, 1, 24, 40, 16), (1, 3)),
    (dict(spatial_dims=2, in_channels=2, **TINY), (3, 2, 32, 32), (3, 1)),
    (dict(spatial_dims=3, drop_last_transition=False, **TINY), (1, 1, 40, 40, 24), (1, 1)),
    (dict(spatial_dims=3, norm="instance", **TINY), (2, 1, 32, 32, 16), (2, 1)),
]


@pytest.mark.parametrize("kwargs, shape, expected", CASES)
def test_output_shapes(kwargs, shape, expected):
    net = DenseNetRegressor(**kwargs).eval()
    with torch.no_grad():
        assert tuple(net(torch.randn(shape)).shape) == expected


def test_full_size_matches_the_seed_paper():
    net = densenet169_regressor()
    # Kim et al.: "Our final model contained 20.4 million parameters"
    assert sum(p.numel() for p in net.parameters()) == 20_386_945
    names = dict(net.features.named_children())
    assert "transition3" not in names and {"transition1", "transition2"} <= set(names)
    assert net.num_features == 2304  # 64 + 6*32 -> 128 + 12*32 -> 256 + 32*32 + 32*32
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(m.negative_slope == pytest.approx(0.01) for m in acts)
    assert not any(type(m) is nn.ReLU for m in net.modules())
    keep_last = densenet169_regressor(drop_last_transition=False)
    assert "transition3" in dict(keep_last.features.named_children())
    assert keep_last.num_features == 1664  # the standard DenseNet-169 width


def test_he_initialisation_scale():
    torch.manual_seed(0)
    net = DenseNetRegressor(3, 1, 1, init_features=64, growth_rate=32, block_config=(2, 2))
    conv = net.features.conv0.weight
    fan_in = conv[0].numel()
    expected = (2.0 / (1 + 0.01 ** 2) / fan_in) ** 0.5
    assert conv.std().item() == pytest.approx(expected, rel=0.05)


def test_output_scaling_is_affine_and_saved():
    net = DenseNetRegressor(3, **TINY).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        raw = net.forward_normalised(x)
        net.set_target_scaling(45.0, 16.0)
        torch.testing.assert_close(net(x), 45.0 + 16.0 * raw)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    other = DenseNetRegressor(3, **TINY).eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(other(x), net(x))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(spatial_dims=4), ValueError, "spatial_dims"),
    (dict(growth_rate=0), ValueError, "growth_rate"),
    (dict(init_features=True), TypeError, "init_features"),
    (dict(block_config=()), ValueError, "block_config"),
    (dict(block_config=(2, 0)), ValueError, r"block_config\[1\]"),
    (dict(dropout_prob=1.0), ValueError, "dropout_prob"),
    (dict(target_scale=0.0), ValueError, "target_scale"),
])
def test_invalid_arguments_name_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        DenseNetRegressor(**kwargs)
