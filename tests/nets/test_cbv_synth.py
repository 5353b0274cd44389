"""The seed-003 CBV synthesis network: the selective scan against a step-by-step reference, its
zero-order-hold steady state and causality, scan paths, network shapes, tiled whole-volume
prediction and the checkpoint loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bidsapp.errors import ModelError
from bidsapp.nets.cbv_synth import (CBV_CHECKPOINT_FORMAT, CBVSynthNet, SelectiveSSM,
                                    StateSpaceBlock, load_cbv_synth, normalise_t1w,
                                    predict_tiled, scan_orders, selective_scan, synthesise_cbv)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second thread only waits for a busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_scan(u, delta, A, B, C, D=None):
    """The S6 recurrence one token at a time (exact ZOH for a diagonal A)."""
    batch, length, channels = u.shape
    h = torch.zeros(batch, channels, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(length):
        dA = delta[:, t, :, None] * A                            # (b, d, n)
        b_bar = (torch.exp(dA) - 1) / A * B[:, t, None, :]       # (b, d, n)
        h = torch.exp(dA) * h + b_bar * u[:, t, :, None]
        y = (h * C[:, t, None, :]).sum(-1)
        ys.append(y if D is None else y + D * u[:, t])
    return torch.stack(ys, 1)


def random_inputs(batch=2, length=37, channels=5, state=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g, dtype=dtype)
    delta = nn.functional.softplus(torch.randn(batch, length, channels, generator=g, dtype=dtype))
    A = -torch.exp(torch.randn(channels, state, generator=g, dtype=dtype))
    B = torch.randn(batch, length, state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, state, generator=g, dtype=dtype)
    D = torch.randn(channels, generator=g, dtype=dtype)
    return u, delta, A, B, C, D


@pytest.mark.parametrize("chunk, with_d", [(1, True), (8, True), (37, False), (64, True)])
def test_selective_scan_matches_the_step_by_step_loop(chunk, with_d):
    u, delta, A, B, C, D = random_inputs()
    D = D if with_d else None
    expected = reference_scan(u.double(), delta.double(), A.double(), B.double(), C.double(),
                              None if D is None else D.double())
    got = selective_scan(u, delta, A, B, C, D, chunk=chunk)
    assert got.shape == u.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_selective_scan_is_float32_stable_for_long_strong_decays():
    # cumulative decays of ~-1e4 within a chunk: a difference of cumulative sums would cancel
    u, delta, A, B, C, D = random_inputs(length=64, seed=1)
    delta, A = delta * 20, A * 10
    expected = reference_scan(*(t.double() for t in (u, delta, A, B, C, D)))
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, chunk=64).double(), expected,
                               atol=1e-5, rtol=1e-5)


def test_zero_order_hold_reaches_the_continuous_steady_state():
    # constant input: h* = Bbar u / (1 - exp(delta A)) = -B u / A exactly, for any step size
    # (the Euler input term delta B u would give a delta-dependent limit)
    A = torch.tensor([[-0.5, -2.0]])
    for step in (0.5, 1.0, 3.0):
        u = torch.full((1, 400, 1), 3.0, dtype=torch.float64)
        y = selective_scan(u, torch.full_like(u, step), A.double(), torch.ones(1, 400, 2).double(),
                           torch.ones(1, 400, 2).double(), torch.tensor([0.25]).double())
        assert y[0, -1, 0].item() == pytest.approx(3.0 * (1 / 0.5 + 1 / 2.0) + 0.75, rel=1e-9)


def _assert_causal(fn, x, t):
    """d y[:, t] / d x[:, s] is exactly zero for s > t and not everywhere zero for s <= t."""
    x = x.clone().requires_grad_(True)
    fn(x)[:, t].sum().backward()
    grad = x.grad.abs().flatten(2).sum((0, 2))  # per token
    assert torch.all(grad[t + 1:] == 0)
    assert grad[t] > 0 and grad[: t + 1].sum() > 0


@pytest.mark.parametrize("t", [0, 9, 20])
def test_selective_scan_is_causal_in_every_input(t):
    u, delta, A, B, C, D = random_inputs(length=30)
    for i in (0, 1, 3, 4):  # u, delta, B, C
        args = [u, delta, A, B, C, D]

        def fn(x, i=i, args=args):
            return selective_scan(*args[:i], x, *args[i + 1:], chunk=8)
        _assert_causal(fn, args[i], t)


def test_mixer_and_single_path_block_are_causal():
    torch.manual_seed(0)
    _assert_causal(SelectiveSSM(6, d_state=3), torch.randn(2, 25, 6), 12)
    block = StateSpaceBlock(4, d_state=3, scan_paths=1)
    grid = (3, 3, 3)

    def as_tokens(tokens):
        return block(tokens.transpose(1, 2).reshape(1, 4, *grid)).flatten(2).transpose(1, 2)
    _assert_causal(as_tokens, torch.randn(1, 27, 4), 13)


def test_two_path_block_sees_both_directions():
    torch.manual_seed(0)
    block = StateSpaceBlock(4, d_state=3, scan_paths=2)
    x = torch.randn(1, 4, 2, 3, 3, requires_grad=True)
    block(x)[..., 0, 0, 0].sum().backward()  # the first token depends on the last one
    assert x.grad[..., -1, -1, -1].abs().sum() > 0


def test_scan_orders_are_permutations_with_reversed_pairs():
    orders = scan_orders((2, 3, 4), 6)
    assert len(orders) == 6
    for forward, backward in zip(orders[::2], orders[1::2]):
        assert sorted(forward.tolist()) == list(range(24))
        assert backward.tolist() == forward.tolist()[::-1]
    # path 2 walks the first axis fastest after rolling: (1, 2, 0) -> index of (i, j, k) = 12i + 4j + k
    assert orders[2][:3].tolist() == [0, 12, 1]
    assert len({tuple(o.tolist()) for o in orders}) == 6
    with pytest.raises(ValueError, match="paths must be <= 4"):
        scan_orders((3, 3), 5)


def test_selective_scan_refuses_bad_inputs():
    u, delta, A, B, C, D = random_inputs()
    with pytest.raises(ValueError, match="negative A"):
        selective_scan(u, delta, A.abs(), B, C, D)
    with pytest.raises(ValueError, match="shapes disagree"):
        selective_scan(u, delta, A, B[:, :-1], C, D)


CASES = [  # (constructor kwargs, input shape)
    (dict(channels=(4, 8, 16), ssm_blocks=2, d_state=4), (2, 1, 8, 12, 8)),
    (dict(channels=(4, 8), ssm_blocks=1, d_state=4, scan_paths=6), (1, 1, 8, 12, 6)),
    (dict(channels=(4,), ssm_blocks=0), (1, 1, 5, 5, 5)),
    (dict(spatial_dims=2, channels=(4, 8), in_channels=2, out_channels=3, scan_paths=4),
     (2, 2, 8, 8)),
]


@pytest.mark.parametrize("kwargs, shape", CASES)
def test_network_output_shape(kwargs, shape):
    net = CBVSynthNet(**kwargs).eval()
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], kwargs.get("out_channels", 1), *shape[2:])
    assert torch.isfinite(out).all()


def test_network_refuses_bad_patches_and_arguments():
    net = CBVSynthNet(channels=(4, 8, 16), ssm_blocks=1, d_state=4)
    assert net.patch_multiple == 4
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="ssm_blocks must be >= 0"):
        CBVSynthNet(ssm_blocks=-1)
    with pytest.raises(ValueError, match="channels must name"):
        CBVSynthNet(channels=())


def test_bottleneck_learns_a_gradient():
    torch.manual_seed(0)
    net = CBVSynthNet(channels=(4, 8), ssm_blocks=1, d_state=4)
    net(torch.randn(2, 1, 8, 8, 8)).abs().mean().backward()
    mixer = net.bottleneck[0].mixers[0]
    assert mixer.A_log.grad.abs().sum() > 0 and mixer.dt_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape, patch, overlap", [
    ((20, 17, 9), 8, 0.5), ((20, 17, 9), (8, 4, 4), 0.0), ((5, 6, 7), 8, 0.75), ((9, 11), 4, 0.5)])
def test_tiling_an_identity_network_reproduces_the_input_exactly(shape, patch, overlap):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = predict_tiled(nn.Identity(), volume, patch, overlap=overlap, batch_size=3)
    assert out.dtype == np.float32 and np.array_equal(out, volume)


def test_tiling_averages_the_overlapping_tiles():
    # a network that adds the tile's own mean: every voxel gets the mean of its tiles' means
    vol = np.arange(6.0, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    out = predict_tiled(lambda x: x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x), vol,
                        (4, 2, 2), overlap=0.5)
    # tiles start at 0 and 2 (step 2): means 1.5 and 3.5; voxels 2 and 3 are in both
    np.testing.assert_allclose(out[:, 0, 0], [1.5, 1.5, 2.5, 2.5, 3.5, 3.5])


def test_tiling_a_single_tile_equals_the_direct_forward_pass_and_keeps_channels():
    torch.manual_seed(0)
    net = CBVSynthNet(channels=(4, 8), ssm_blocks=1, d_state=4, out_channels=2).eval()
    vol = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    out = predict_tiled(net, vol, 8)
    with torch.no_grad():
        direct = net(torch.from_numpy(vol)[None, None])[0].numpy()
    assert out.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(out, direct, rtol=1e-6, atol=1e-6)


def test_normalise_t1w_divides_by_the_top_percent_mean():
    data = np.random.default_rng(0).uniform(1, 1000, size=(10, 10, 5)).astype(np.float32)
    data[0] = 0  # background
    inside = np.sort(data[data != 0])
    expected = inside[-5:].mean()  # 450 non-zero voxels: the top ceil(4.5) = 5
    np.testing.assert_allclose(normalise_t1w(data), data / expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no voxel"):
        normalise_t1w(np.zeros((3, 3, 3)))


def test_synthesise_cbv_is_zero_outside_the_brain(tmp_path):
    torch.manual_seed(0)
    net = CBVSynthNet(channels=(4, 8), ssm_blocks=1, d_state=4)
    t1w = np.zeros((10, 12, 9), np.float32)
    t1w[2:8, 3:9, 2:7] = np.random.default_rng(0).uniform(100, 800, (6, 6, 5))
    cbv = synthesise_cbv(net, t1w, 8)
    assert cbv.shape == t1w.shape and np.all(cbv[t1w == 0] == 0) and np.any(cbv[t1w != 0] != 0)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    net = CBVSynthNet(channels=(4, 8), ssm_blocks=1, d_state=4)
    path = tmp_path / "cbv_synth.pt"
    torch.save({"format": CBV_CHECKPOINT_FORMAT, "model_args": net.init_args,
                "model": net.state_dict(), "patch": 16}, path)
    loaded, meta = load_cbv_synth(path)
    assert meta["patch"] == 16 and not loaded.training
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x), rtol=0, atol=0)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a CBV synthesis checkpoint"):
        load_cbv_synth(tmp_path / "other.pt")
    with pytest.raises(ModelError, match="cannot read"):
        load_cbv_synth(tmp_path / "missing.pt")
