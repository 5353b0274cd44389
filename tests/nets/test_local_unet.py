"""The seed-000 local brain-age U-Net: valid-convolution arithmetic, receptive field, parameter
count, squeeze-and-excitation, output scaling, auxiliary heads and Monte-Carlo dropout."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import ChannelSELayer
from torch import nn

from bidsapp.nets import LocalUNet, enable_mc_dropout, local_unet_input_size, local_unet_sizes

CASES = [  # (constructor kwargs, input shape, voxel output shape, aux output shapes)
    (dict(init_channels=4), (2, 2, 52, 52, 52), (2, 1, 12, 12, 12), [(2, 1), (2, 1)]),
    (dict(init_channels=4), (1, 2, 60, 60, 60), (1, 1, 20, 20, 20), [(1, 1), (1, 1)]),
    (dict(init_channels=4, depth=1), (1, 2, 24, 24, 24), (1, 1, 8, 8, 8), [(1, 1)]),
    (dict(init_channels=4, convs_per_scale=1), (1, 2, 30, 30, 30), (1, 1, 10, 10, 10),
     [(1, 1), (1, 1)]),
    (dict(spatial_dims=2, init_channels=4, in_channels=1, out_channels=2), (3, 1, 52, 52),
     (3, 2, 12, 12), [(3, 2), (3, 2)]),
]


def test_valid_convolution_arithmetic_by_hand():
    # 52 -2-2-> 48 /2-> 24 -2-2-> 20 /2-> 10 -2-2-> 6 (bottom) x2-> 12 -2-2-> 8 x2-> 16 -2-2-> 12;
    # skips: 20 cropped to 12, 48 cropped to 16 (4 and 16 voxels off each side)
    assert local_unet_sizes(52) == {"encoder": [48, 20], "bottom": 6, "decoder": [8, 12],
                                    "output": 12, "margin": 20}
    assert local_unet_input_size(12) == 52
    # depth 2, two convolutions: out = in - 2 * 2 * (3 * 4 - 2) = in - 40 for every valid size
    for size in (44, 56, 60, 68, 76):
        assert local_unet_sizes(size)["output"] == size - 40
    assert local_unet_sizes(30, depth=2, convs_per_scale=1)["output"] == 10
    with pytest.raises(ValueError, match="must be even"):
        local_unet_sizes(50)      # 50 - 4 = 46 -> 23 -> 19: odd before the second pooling
    with pytest.raises(ValueError, match="too small"):
        local_unet_sizes(40)


@pytest.mark.parametrize("kwargs, shape, voxel, aux", CASES)
def test_output_shapes(kwargs, shape, voxel, aux):
    net = LocalUNet(**kwargs).eval()
    with torch.no_grad():
        out, blocks = net(torch.rand(shape), return_aux=True)
        assert tuple(out.shape) == voxel and [tuple(b.shape) for b in blocks] == aux
        assert torch.equal(net(torch.zeros(shape)), net(torch.zeros(shape), return_aux=True)[0])


def _input_support(net: nn.Module, index: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Input range (per axis) on which one output voxel depends: non-zero gradient."""
    nn.init.ones_(net.output.weight)  # the output convolution starts at zero
    x = torch.rand(1, 2, 52, 52, 52, requires_grad=True)
    net(x)[(0, 0, *index)].backward()
    hits = (x.grad.abs().sum(dim=(0, 1)) > 0).nonzero()
    return [(int(hits[:, a].min()), int(hits[:, a].max())) for a in range(3)]


def test_receptive_field_without_excitation_by_hand():
    net = LocalUNet(init_channels=2, se=False)
    # output voxel i: fine path (skip of level 0) covers input i+16 .. i+24; the coarse paths
    # through the 2x2x2 pools reach down to 2*(i//4) and up to 2*(2*((i//2+6)//2)+9+4)+1+4:
    # [0, 43] for i = 0 and [8, 51] for i = 11 (an input of 52 is exactly what the output needs)
    assert _input_support(net, (0, 0, 0)) == [(0, 43)] * 3
    assert _input_support(net, (11, 11, 11)) == [(8, 51)] * 3
    assert _input_support(net, (0, 5, 11)) == [(0, 43), (4, 47), (8, 51)]


def test_excitation_makes_the_whole_block_the_context():
    net = LocalUNet(init_channels=2)
    # untrained, every gate is the constant 1/2: only the convolutions' receptive field counts
    assert _input_support(net, (0, 0, 0)) == [(0, 43)] * 3
    gates = [m for m in net.modules() if isinstance(m, ChannelSELayer)]
    with torch.no_grad():
        for gate in gates:
            y = torch.rand(1, gate.fc[0].in_features, 3, 3, 3)
            assert torch.equal(gate(y), 0.5 * y)
        for gate in gates:
            nn.init.normal_(gate.fc[2].weight)
    # learnt gates average over the block: every output depends on every input voxel
    assert _input_support(net, (0, 0, 0)) == [(0, 51)] * 3


def test_paper_network_and_parameter_count_by_hand():
    net = LocalUNet()  # init_channels 64, depth 2, two convolutions per scale
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    assert len(convs) == 10 and all(c.padding == (0, 0, 0) and c.stride == (1, 1, 1) for c in convs)
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 128, 128, 64, 64]
    assert sum(isinstance(m, ChannelSELayer) for m in net.modules()) == 10
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 10 and all(a.negative_slope == pytest.approx(0.2) for a in acts)
    assert all(p.kernel_size == 2 and p.stride == 2 for p in net.modules()
               if isinstance(p, nn.AvgPool3d))
    # conv (27 cin cout + cout), SE (c*h + h + h*c + c with h = c // 16), transposed conv 2^3,
    # output 1^3 conv, aux dense heads 256 -> 1 and 128 -> 1
    se = {c: 2 * c * (c // 16) + c // 16 + c for c in (64, 128, 256)}
    enc0 = (27 * 2 * 64 + 64) + (27 * 64 * 64 + 64) + 2 * se[64]
    enc1 = (27 * 64 * 128 + 128) + (27 * 128 * 128 + 128) + 2 * se[128]
    bottom = (27 * 128 * 256 + 256) + (27 * 256 * 256 + 256) + 2 * se[256]
    dec1 = (8 * 256 * 128 + 128) + (27 * 256 * 128 + 128) + (27 * 128 * 128 + 128) + 2 * se[128]
    dec0 = (8 * 128 * 64 + 64) + (27 * 128 * 64 + 64) + (27 * 64 * 64 + 64) + 2 * se[64]
    total = enc0 + enc1 + bottom + dec1 + dec0 + (64 + 1) + (256 + 1) + (128 + 1)
    assert sum(p.numel() for p in net.parameters()) == total == 5_448_275


def test_untrained_network_predicts_the_offset_and_keeps_its_signal():
    # seeded, and 16 channels: with 4 the bottleneck's spread varies ~30-fold between random inits
    torch.manual_seed(0)
    net = LocalUNet(init_channels=16).eval()
    net.set_target_scaling(45.5, 12.0)
    with torch.no_grad():
        out, aux = net(torch.rand(1, 2, 52, 52, 52), return_aux=True)
        assert torch.all(out == 45.5)  # zero output convolution
        # the doubled He weights offset the 1/2 gate of every excitation: the bottleneck keeps
        # the input's order of magnitude (a gate-halved signal would be ~2**-6 of it)
        x = torch.rand(2, 2, 52, 52, 52)  # std 0.29
        for scale in net.encoder:
            x = net.pool(scale(x))
        assert 0.1 < float(net.bottom(x).std()) < 10
    with pytest.raises(ValueError, match="scale"):
        net.set_target_scaling(40.0, 0.0)


def test_monte_carlo_dropout():
    torch.manual_seed(0)
    net = LocalUNet(init_channels=4, dropout=0.3)
    nn.init.normal_(net.output.weight)
    x = torch.rand(1, 2, 52, 52, 52)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x), net(x))
        assert enable_mc_dropout(net) == 5  # after each of the five scales
        assert not net.training and not torch.equal(net(x), net(x))
    assert enable_mc_dropout(LocalUNet(init_channels=4)) == 0


def test_input_statistics_travel_with_the_weights_and_z_score_the_input():
    import numpy as np

    shape = (2, 7, 6, 5)
    rng = np.random.default_rng(0)
    mean, sd = rng.normal(size=shape), rng.uniform(0.5, 2.0, size=shape)
    net = LocalUNet(init_channels=2, depth=1, convs_per_scale=1, input_shape=shape)
    assert {"input_mean", "input_std"} <= set(net.state_dict())
    net.set_input_statistics(mean, sd)
    # a second network gets them from the state dict alone (as a shipped checkpoint does)
    other = LocalUNet(init_channels=2, depth=1, convs_per_scale=1, input_shape=shape)
    other.load_state_dict(net.state_dict())
    data = rng.normal(size=shape)
    expected = (data - mean.astype(np.float32)) / sd.astype(np.float32)
    assert np.allclose(other.standardize(data), expected, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        other.standardize(data[:, :-1])
    with pytest.raises(ValueError, match="SD > 0"):
        net.set_input_statistics(mean, np.zeros(shape))
    with pytest.raises(ValueError, match="input_shape"):
        LocalUNet(init_channels=2, depth=1, convs_per_scale=1, input_shape=(3, 7, 6, 5))
    raw = LocalUNet(init_channels=2, depth=1, convs_per_scale=1)
    assert "input_mean" not in raw.state_dict() and np.array_equal(raw.standardize(data),
                                                                   data.astype(np.float32))
    with pytest.raises(ValueError, match="without input_shape"):
        raw.set_input_statistics(mean, sd)
