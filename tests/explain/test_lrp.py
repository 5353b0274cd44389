"""LRP with zennit: import without torchvision, the composite rule by rule, conservation."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bidsapp.explain.lrp import import_zennit, lrp_ensemble, lrp_relevance, mlens_composite
from bidsapp.nets import MLENS_LEAKY_RELU, MLENS_RELU, MLensCNN


def _net(seed: int, act=MLENS_RELU, shape=(12, 10), bias_scale=0.3, filters=(3, 4, 4, 3, 2),
         dense=5) -> MLensCNN:
    """A small 2D base model with random (also negative) weights and non-zero biases."""
    torch.manual_seed(seed)
    net = MLensCNN(2, in_shape=shape, filters=filters, act=act, dense_units=dense,
                   output_bias=47.0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") and not name.startswith("head.out"):
                p.uniform_(-bias_scale, bias_scale)
    return net.eval()


def test_zennit_imports_without_torchvision():
    zennit = import_zennit()
    assert hasattr(zennit, "composites") and hasattr(zennit, "rules")
    if importlib.util.find_spec("torchvision") is None:
        # only the placeholder stands in for zennit's torchvision canonizers
        assert sys.modules["zennit.torchvision"].__doc__.startswith("Placeholder")


# ---------------------------------------------------------------- an independent reference
def _conv_contributions(a: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """Contributions x_j * w_fj of every input j of every output f at every position l."""
    k = conv.kernel_size[0]
    patches = F.unfold(a[None], k, padding=conv.padding[0])[0]          # (C*k*k, L)
    weight = conv.weight.reshape(conv.out_channels, -1)                   # (F, C*k*k)
    return weight[:, :, None] * patches[None]                             # (F, C*k*k, L)


def _fold(r_patch: torch.Tensor, conv: torch.nn.Conv2d, shape) -> torch.Tensor:
    k = conv.kernel_size[0]
    return F.fold(r_patch[None], shape[1:], k, padding=conv.padding[0])[0]


def _reference_lrp(net: MLensCNN, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LRP of one 2D input written out rule by rule (no zennit): flat on conv0, alpha1-beta0
    on the other convolutions, epsilon on dense layers, biases ignored, winner-take-all pools,
    activations passed, starting from prediction - output bias."""
    acts, a = [], x
    with torch.no_grad():
        for i in range(5):
            conv = getattr(net.features, f"conv{i}")
            acts.append(a)
            z = conv(a[None])[0]
            a_act = getattr(net.features, f"act{i}")(z)
            pooled, idx = F.max_pool2d(a_act[None], 3, 2, 1, return_indices=True)
            acts.append((a_act.shape, idx[0]))
            a = pooled[0]
        flat = a.reshape(-1)
        hidden = net.head.act(net.head.dense(flat))
        out = net.head.out(hidden)[0]
        # output layer and dense layer: epsilon rule, biases ignored
        w = net.head.out.weight[0]
        z = (w * hidden).sum()
        r_hidden = w * hidden * (out - net.head.out.bias[0]) / (z + eps * torch.sign(z))
        c = net.head.dense.weight * flat[None]                             # (units, inputs)
        zd = c.sum(dim=1)
        r = (c * (r_hidden / (zd + eps * torch.where(zd >= 0, 1.0, -1.0)))[:, None]).sum(0)
        r = r.reshape(a.shape)
        for i in reversed(range(5)):
            conv = getattr(net.features, f"conv{i}")
            act_shape, idx = acts[2 * i + 1]
            # max-pool: each pooled relevance goes to its winning input
            unpooled = torch.zeros(act_shape).reshape(act_shape[0], -1)
            unpooled.scatter_add_(1, idx.reshape(act_shape[0], -1), r.reshape(act_shape[0], -1))
            r_out = unpooled.reshape(act_shape).reshape(conv.out_channels, -1)    # (F, L)
            a_in = acts[2 * i]
            if i == 0:   # flat: every (valid) input of the receptive field weighs 1
                ones = F.unfold(torch.ones_like(a_in)[None], conv.kernel_size[0],
                                padding=conv.padding[0])[0]               # (C*k*k, L)
                share = ones[None].expand(conv.out_channels, -1, -1)
            else:        # alpha1-beta0: positive contributions only
                share = _conv_contributions(a_in, conv).clamp(min=0)
            zc = share.sum(dim=1, keepdim=True)
            r_patch = (share * r_out[:, None] / (zc + 1e-6)).sum(dim=0)
            r = _fold(r_patch, conv, a_in.shape)
    return r.sum(dim=0)


@pytest.mark.parametrize("seed, act", [(0, MLENS_RELU), (1, MLENS_RELU), (2, MLENS_LEAKY_RELU)])
def test_composite_matches_a_rule_by_rule_reference(seed, act):
    net = _net(seed, act)
    x = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, 12, 10)).astype(np.float32))
    x[:, :3] = 0  # zero background: the flat rule still gives it relevance
    relevance, prediction, bias = lrp_relevance(net, x)
    expected = _reference_lrp(net, x).numpy()
    assert relevance.shape == (1, 12, 10)
    np.testing.assert_allclose(relevance[0], expected, rtol=2e-3, atol=1e-6 * np.abs(expected).max())
    assert np.abs(relevance[0, :3]).sum() > 0
    with torch.no_grad():
        assert prediction[0] == pytest.approx(float(net(x[None])[0, 0]), rel=1e-6)
    assert bias[0] == pytest.approx(47.0)


@pytest.mark.parametrize("act", [MLENS_RELU, MLENS_LEAKY_RELU])
def test_relevance_is_conserved(act):
    # the paper-size filters: in a network so narrow that every feature of an input dies, the
    # hidden biases alone make the prediction and the bias-free rules have no input to give
    # that relevance to (sum 0); trained networks are far from it (tori: error < 1e-5)
    net = _net(5, act, shape=(16, 16), bias_scale=0.3, filters=(16, 16, 32, 64, 32), dense=64)
    x = torch.rand(6, 1, 16, 16) * 255
    relevance, prediction, bias = lrp_relevance(net, x)
    sums = relevance.reshape(6, -1).sum(axis=1)
    np.testing.assert_allclose(sums, prediction - bias[0], rtol=1e-3, atol=1e-5)


def test_first_rule_alpha1beta0_gives_zero_inputs_no_relevance():
    net = _net(3)
    x = torch.rand(1, 1, 12, 10) * 255
    x[..., :4, :] = 0
    flat, _, _ = lrp_relevance(net, x)
    plain, pred, bias = lrp_relevance(net, x, first_rule="alpha1beta0")
    assert np.all(plain[0, :4] == 0) and np.abs(flat[0, :4]).sum() > 0
    assert plain.sum() == pytest.approx(float(pred[0] - bias[0]), rel=1e-3)
    with pytest.raises(ValueError, match="first_rule"):
        mlens_composite(first_rule="zplus")


def test_ensemble_map_is_the_mean_of_the_members():
    nets = [_net(s) for s in (10, 11, 12)]
    x = np.random.default_rng(0).uniform(0, 255, (12, 10)).astype(np.float32)
    mean_map, evidence = lrp_ensemble(nets, x)
    single = [lrp_relevance(n, x) for n in nets]
    np.testing.assert_allclose(mean_map, np.mean([s[0][0] for s in single], axis=0), rtol=1e-6)
    np.testing.assert_allclose(evidence, [s[1][0] - s[2][0] for s in single], rtol=1e-6)
    assert mean_map.sum() == pytest.approx(float(evidence.mean()), rel=1e-3)


def test_refuses_networks_without_a_single_output():
    net = MLensCNN(2, in_shape=(8, 8), out_channels=2)
    with pytest.raises(ValueError, match="single regression output"):
        lrp_relevance(net, np.zeros((1, 8, 8), np.float32))
    with pytest.raises(TypeError, match="output_layer"):
        lrp_relevance(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1)),
                      np.zeros((1, 1, 2, 2), np.float32))
