"""The seed-001 diffusion autoencoder: paper size, shapes, checks, loss terms, DDIM, MC dropout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn

from bidsapp.nets import (DIFFUSION_AE_CHANNELS, DiffusionAE, age_direction, ddim_decode,
                          ddim_encode, ddim_interpolate, ddim_reconstruct, ddim_timesteps,
                          manipulate_age, mc_dropout_age, slerp)
from bidsapp.nets.diffusion_ae import _SelfAttention

TINY = dict(channels=(8, 8, 16), norm_num_groups=8, embed_dim=16, latent_dim=16,
            attention_head_channels=8, age_hidden=(8, 4))
CASES = [  # (constructor kwargs, input shape)
    (dict(TINY), (2, 1, 32, 32)),
    (dict(TINY, num_res_blocks=1, resblock_updown=False, attention_blocks=0), (3, 1, 16, 24)),
    (dict(TINY, spatial_dims=3, attention_blocks=1), (2, 1, 8, 8, 12)),
    (dict(TINY, in_channels=2, channels=(8,)), (2, 2, 5, 7)),
]


# small networks gain nothing from more threads (see the fixture's docstring)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomise_zero_weights(net: DiffusionAE, std: float = 0.05) -> None:
    """Give weights to the layers that start at zero.

    These are the output convolution (so epsilon_theta = 0 at first), the second convolution
    of every MONAI residual block (so the time and z_sem embeddings act only after the first
    step) and the attention output projections.
    """
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not torch.count_nonzero(p):
                p.normal_(0.0, std)


@pytest.mark.parametrize("kwargs, shape", CASES)
def test_shapes(kwargs, shape):
    torch.manual_seed(0)
    net = DiffusionAE(**kwargs).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        z = net.encode(x)
        assert tuple(net(x).shape) == (shape[0], 1)
        assert tuple(z.shape) == (shape[0], kwargs["latent_dim"])
        t = torch.randint(0, 1000, (shape[0],))
        assert net.noise_prediction(net.to_model_space(x), t, z).shape == x.shape


def test_paper_size_and_parameter_count():
    net = DiffusionAE()
    assert net.channels == DIFFUSION_AE_CHANNELS == (32, 32, 64, 96, 128)
    assert (_count(net.noise_net), _count(net.encoder), _count(net.age_head)) \
        == (7_304_289, 2_219_360, 70_145)
    assert _count(net) == 9_593_794  # the paper: 10.12 M (see the module docstring)
    # five levels, two residual blocks each, residual-block downsampling except the last
    assert [len(b.resnets) for b in net.noise_net.down_blocks] == [2] * 5
    assert [b.resnets[-1].out_channels for b in net.noise_net.down_blocks] == [32, 32, 64, 96, 128]
    assert [b.downsampler is not None for b in net.noise_net.down_blocks] == [True] * 4 + [False]
    assert [b.resnets[-1].out_channels for b in net.noise_net.up_blocks] == [128, 96, 64, 32, 32]
    # three attention blocks in the middle of both the U-Net and the semantic encoder
    for middle in (net.noise_net.middle_block, net.encoder.middle_block):
        assert len(middle.attention) == 3
        assert all(isinstance(a, _SelfAttention) and a.heads == 4 for a in middle.attention)
    # GroupNorm + SiLU before each convolution of a MONAI residual block (32 groups)
    block = net.noise_net.down_blocks[2].resnets[0]
    assert isinstance(block, DiffusionUNetResnetBlock) and block.norm1.num_groups == 32
    assert isinstance(block.nonlinearity, nn.SiLU)
    # z_sem of 512; f_psi: 512 -> 128 -> 32 -> 1, ReLU, batch norm, dropout 0.5 in between
    assert net.encoder.out[-1].out_features == 512 == net.latent_dim
    dense = [m for m in net.age_head if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(512, 128), (128, 32), (32, 1)]
    kinds = [type(m).__name__ for m in net.age_head]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Dropout"] * 2 + ["Linear"]
    assert all(m.p == 0.5 for m in net.age_head if isinstance(m, nn.Dropout))
    # the age MLP by hand
    assert _count(net.age_head) == (512 * 128 + 128) + 2 * 128 + (128 * 32 + 32) + 2 * 32 + 33


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(spatial_dims=1), ValueError, "spatial_dims"),
    (dict(channels=()), ValueError, "at least one"),
    (dict(channels=(8, 12)), ValueError, "multiple of norm_num_groups"),
    (dict(channels=(32, 64), attention_head_channels=48), ValueError, "must divide"),
    (dict(num_res_blocks=0), ValueError, "num_res_blocks"),
    (dict(latent_dim=2.0), TypeError, "latent_dim"),
    (dict(attention_blocks=-1), ValueError, "attention_blocks"),
    (dict(age_hidden=(128, 0)), ValueError, r"age_hidden\[1\]"),
    (dict(age_dropout=1.0), ValueError, "age_dropout"),
    (dict(resblock_updown=1), TypeError, "resblock_updown"),
    (dict(beta_schedule="cosine"), ValueError, "beta_schedule"),
    (dict(beta_start=0.02, beta_end=0.01), ValueError, "beta_start < beta_end"),
    (dict(target_scale=0.0), ValueError, "target_scale"),
])
def test_constructor_checks(kwargs, error, message):
    with pytest.raises(error, match=message):
        DiffusionAE(**{**TINY, **kwargs})


def test_input_sides_must_survive_the_downsampling():
    net = DiffusionAE(**TINY).eval()  # three levels: sides divisible by 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 30, 32))


def test_noise_prediction_depends_on_z_sem_at_every_timestep():
    torch.manual_seed(1)
    net = DiffusionAE(**TINY).eval()
    _randomise_zero_weights(net)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z = torch.randn(2, 16)
    with torch.no_grad():
        for t in (0, 500, 999):
            steps = torch.full((2,), t)
            same = net.noise_prediction(x, steps, z)
            assert torch.equal(same, net.noise_prediction(x, steps, z))
            assert not torch.allclose(same, net.noise_prediction(x, steps, z + 1.0))
            other = torch.full((2,), (t + 300) % 1000)
            assert not torch.allclose(same, net.noise_prediction(x, other, z))


def test_training_losses_known_answers():
    torch.manual_seed(2)
    net = DiffusionAE(**TINY, target_offset=40.0, target_scale=10.0)
    x = torch.rand(4, 1, 16, 16)
    noise = torch.randn(4, 1, 16, 16)
    t = torch.tensor([0, 10, 500, 999])
    # the output convolution starts at zero: epsilon_theta = 0, so the noise MSE is E[noise^2]
    net.eval()
    with torch.no_grad():
        terms = net.training_losses(x, torch.tensor([30.0, math.nan, 50.0, math.nan]), t, noise)
    assert float(terms["diffusion"]) == pytest.approx(float(torch.mean(noise ** 2)), rel=1e-6)
    with torch.no_grad():
        predicted = net(x)[:, 0]
    expected = (((predicted[0] - 30.0) / 10.0) ** 2 + ((predicted[2] - 50.0) / 10.0) ** 2) / 2
    assert float(terms["age"]) == pytest.approx(float(expected), rel=1e-6)
    assert int(terms["n_labelled"]) == 2
    # the same through forward (the path a DDP wrapper sees)
    with torch.no_grad():
        again = net(x, ages=torch.tensor([30.0, math.nan, 50.0, math.nan]))
    assert float(again["age"]) == pytest.approx(float(expected), rel=1e-6)


def test_hidden_ages_give_a_zero_age_term_and_zero_age_mlp_gradients():
    torch.manual_seed(3)
    net = DiffusionAE(**TINY, target_offset=40.0, target_scale=10.0).train()
    _randomise_zero_weights(net)
    x = torch.rand(4, 1, 16, 16)
    terms = net.training_losses(x, torch.full((4,), math.nan))
    assert terms["age"].item() == 0.0 and int(terms["n_labelled"]) == 0
    (terms["diffusion"] + terms["age"]).backward()
    for name, p in net.age_head.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    # the diffusion term still trains the semantic encoder and the U-Net
    assert any(torch.count_nonzero(p.grad) for p in net.encoder.parameters())
    assert any(torch.count_nonzero(p.grad) for p in net.noise_net.parameters())
    # with one age, the age MLP receives gradient, all finite (the NaN targets never enter)
    net.zero_grad()
    terms = net.training_losses(x, torch.tensor([math.nan, 55.0, math.nan, math.nan]))
    (terms["diffusion"] + terms["age"]).backward()
    grads = [p.grad for p in net.age_head.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(torch.count_nonzero(g) for g in grads)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1).tolist() == [999]
    assert ddim_timesteps(1000, 3).tolist() == [332, 666, 999]
    assert ddim_timesteps(1000, 1000).tolist() == list(range(1000))
    with pytest.raises(ValueError, match="cannot exceed"):
        ddim_timesteps(100, 101)


def test_ddim_with_zero_noise_prediction_is_an_exact_scaling():
    """Untrained, epsilon_theta = 0: x_T = sqrt(alpha_bar_{T-1}) x_0, decoding undoes it."""
    torch.manual_seed(4)
    net = DiffusionAE(**TINY).train()
    x = torch.rand(2, 1, 16, 16)
    code = ddim_encode(net, x, steps=25)
    assert net.training  # the mode is restored
    scale = float(net.alphas_cumprod[-1]) ** 0.5
    torch.testing.assert_close(code.x_T, scale * (2 * x - 1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(code.z_sem, net.eval().encode(x))
    torch.testing.assert_close(ddim_decode(net, code.x_T, code.z_sem, 25), x, rtol=0, atol=1e-5)


class _GaussianOracle(DiffusionAE):
    """The exact noise predictor for data x_0 ~ N(0, s^2 I).

    eps = sqrt(1 - a) x_t / (a s^2 + 1 - a), with a = alpha_bar_t.

    Its probability-flow ODE maps x_0 to x_T = x_0 sqrt(a_T s^2 + 1 - a_T) / s, a known answer
    for the DDIM discretisation.
    """

    s = 0.3

    def noise_prediction(self, x_t, timesteps, z):
        a = self.alphas_cumprod[timesteps].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return (1 - a).sqrt() * x_t / (a * self.s ** 2 + 1 - a)


def test_ddim_solves_the_probability_flow_of_gaussian_data():
    net = _GaussianOracle(**TINY)
    x = torch.rand(2, 1, 8, 8)
    x0 = 2 * x - 1
    a_T = float(net.alphas_cumprod[-1])
    exact = x0 * math.sqrt(a_T * net.s ** 2 + 1 - a_T) / net.s
    errors, round_trip = {}, {}
    for steps in (20, 200, 1000):
        code = ddim_encode(net, x, steps)
        errors[steps] = float((code.x_T - exact).abs().max() / exact.abs().max())
        back = ddim_decode(net, code.x_T, code.z_sem, steps)
        round_trip[steps] = float((back - x).abs().max())
    # a first-order solver: ten times the steps, a tenth of the error (measured: 0.19, 0.021,
    # 0.0038 for 20, 200, 1000 steps)
    assert 7 < errors[20] / errors[200] < 13
    assert errors[1000] < 0.005 and round_trip[1000] < 0.005
    assert round_trip[200] < 0.03 < round_trip[20]


def _discs(size: int = 16) -> torch.Tensor:
    grid = np.indices((size, size)).astype(np.float32)
    images = []
    for i, (cx, cy, r) in enumerate([(0.4, 0.5, 0.25), (0.6, 0.45, 0.35)]):
        d = np.hypot(grid[0] - cx * size, grid[1] - cy * size)
        images.append(np.clip((r * size - d) / 2, 0, 1) * (0.6 + 0.3 * i))
    return torch.from_numpy(np.stack(images))[:, None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / torch.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def toy_model():
    """A tiny diffusion autoencoder trained for 120 Adam steps on two disc images (5-15 s)."""
    torch.manual_seed(0)
    net = DiffusionAE(channels=(8, 16), num_res_blocks=1, attention_blocks=1,
                      attention_head_channels=8, norm_num_groups=8, embed_dim=32, latent_dim=8,
                      age_hidden=(4,))
    images = _discs()
    batch, ages = images.repeat(2, 1, 1, 1), torch.tensor([30.0, 60.0]).repeat(2)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(120):
        terms = net.training_losses(batch, ages)
        optimiser.zero_grad()
        (terms["diffusion"] + terms["age"]).backward()
        optimiser.step()
    return net.eval(), images


def test_trained_toy_model_reconstructs_through_its_codes(toy_model):
    net, images = toy_model
    code = ddim_encode(net, images, steps=50)
    recon = ddim_decode(net, code.x_T, code.z_sem, steps=50)
    assert _psnr(recon, images) > 17.0  # measured: 20.2 dB
    # x_T carries the image: the other image's code decodes to something far worse
    swapped = ddim_decode(net, code.x_T.flip(0), code.z_sem, steps=50)
    assert _psnr(swapped, images) < _psnr(recon, images) - 8.0  # measured: 5.9 dB
    torch.testing.assert_close(ddim_reconstruct(net, images, 50), recon)


def test_interpolation_ends_are_the_reconstructions(toy_model):
    net, images = toy_model
    rows = ddim_interpolate(net, images[0], images[1], weights=(0.0, 0.5, 1.0), steps=20)
    assert rows.shape == (3, 1, 16, 16)
    code = ddim_encode(net, images, steps=20)
    ends = ddim_decode(net, code.x_T, code.z_sem, steps=20)
    torch.testing.assert_close(rows[[0, 2]], ends, rtol=1e-4, atol=1e-4)
    # halfway is neither end
    assert all(float((rows[1] - end).abs().max()) > 0.05 for end in ends)
    with pytest.raises(ValueError, match="weights"):
        ddim_interpolate(net, images[0], images[1], weights=(1.5,))


def test_slerp_keeps_the_norm_of_orthogonal_codes():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    for w in (0.0, 0.3, 1.0):
        out = slerp(a, b, w)
        assert float(out.norm()) == pytest.approx(3.0, rel=1e-6)
        assert float(out[1]) == pytest.approx(3.0 * math.sin(w * math.pi / 2), abs=1e-6)


def test_age_direction_recovers_a_planted_linear_age():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 6))
    w = np.array([2.0, -1.0, 0.0, 0.5, 0.0, 0.0])
    direction, years = age_direction(z, 50 + z @ w, ridge=0.0)
    np.testing.assert_allclose(direction, w / np.linalg.norm(w), atol=1e-9)
    assert years == pytest.approx(np.linalg.norm(w))
    with pytest.raises(ValueError, match="N >= 2"):
        age_direction(z[:1], [30.0])


def test_manipulate_age_decodes_latents_moved_along_the_direction(toy_model):
    net, images = toy_model
    torch.manual_seed(5)
    with torch.no_grad():
        z = net.encode(images)
    direction = np.ones(net.latent_dim) / math.sqrt(net.latent_dim)
    out = manipulate_age(net, images[0], direction, years_per_unit=10.0, years=(0.0, 20.0),
                         steps=10)
    code = ddim_encode(net, images[:1], 10)
    torch.testing.assert_close(out[:1], ddim_decode(net, code.x_T, code.z_sem, 10))
    # the second image is decoded from z_sem + 2 (20 / 10) unit steps along the direction
    moved = z[:1] + 2.0 * torch.as_tensor(direction, dtype=z.dtype)
    shifted = ddim_decode(net, code.x_T, moved, 10)
    torch.testing.assert_close(out[1:], shifted)


def test_mc_dropout_interval():
    torch.manual_seed(6)
    net = DiffusionAE(**TINY, target_offset=50.0, target_scale=10.0)
    net.train()
    with torch.no_grad():  # give the batch norms non-trivial running statistics
        for _ in range(3):
            net(torch.rand(8, 1, 16, 16))
    x = torch.rand(1, 1, 16, 16)  # one image: batch norm must run on its running statistics
    first = mc_dropout_age(net, x, samples=40, generator=torch.Generator().manual_seed(0))
    again = mc_dropout_age(net, x, samples=40, generator=torch.Generator().manual_seed(0))
    assert net.training
    for key in ("mean", "sd", "lower", "upper", "deterministic"):
        assert first[key].shape == (1,)
        np.testing.assert_array_equal(first[key], again[key])
    assert first["lower"][0] <= first["mean"][0] <= first["upper"][0]
    assert first["upper"][0] - first["lower"][0] > 0 and first["sd"][0] > 0
    with torch.no_grad():
        assert first["deterministic"][0] == pytest.approx(float(net.eval()(x)), rel=1e-6)
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_age(DiffusionAE(**TINY, age_dropout=0.0), x)
    with pytest.raises(ValueError, match="level"):
        mc_dropout_age(net, x, level=1.0)


def test_reconstruction_quality_equals_scikit_image():
    """SSIM (Gaussian window, sigma 1.5, population covariance) and PSNR as scikit-image has them."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from bidsapp.nets import reconstruction_quality

    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.random((3, 1, 40, 40)))
    # out-of-range values are clipped to [0, 1] before the metrics
    recon = images + torch.from_numpy(rng.normal(0, 0.1, images.shape))
    got = reconstruction_quality(recon, images)
    clipped = recon.clamp(0, 1).numpy()
    for k in range(3):
        a, b = images[k, 0].numpy(), clipped[k, 0]
        ssim = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
        assert got["ssim"][k] == pytest.approx(ssim, abs=1e-6)
        assert got["psnr"][k] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0),
                                               rel=1e-6)
    perfect = reconstruction_quality(images, images)
    np.testing.assert_allclose(perfect["ssim"], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        reconstruction_quality(images[:, :, :20], images)
