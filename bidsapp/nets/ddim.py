"""Deterministic DDIM encoding and decoding with a diffusion autoencoder (seed 001).

A diffusion autoencoder represents an image by two codes: the semantic latent z_sem = s_phi(x_0)
and the stochastic code x_T.  x_T comes from running the deterministic DDIM process (Song et
al., eta = 0) forwards, conditioned on z_sem.  Decoding runs the same process backwards from
(x_T, z_sem) and returns the image up to the discretisation error of the ODE.  Moving z_sem
while x_T stays fixed changes what the image shows, e.g. its apparent age, and keeps the
details that x_T encodes (Preechakul et al.; the age interpolations of the paper's appendix).

The networks are :class:`bidsapp.nets.diffusion_ae.DiffusionAE`; images are the prepared [0, 1]
slices, codes x_T live in the model's [-1, 1] space.

The update rule is written here, on the noise schedule of the network (MONAI's
``DDPMScheduler``), instead of using MONAI's ``DDIMScheduler.step``/``reversed_step``, because:

* ``set_timesteps`` spaces the steps by ``linspace(T - 1, 0, n).round()``, but ``step`` moves
  by ``T // n`` (999 -> 899 while the next step starts from 888 for n = 10), so decoding and
  encoding do not visit the same noise levels unless n divides both;
* ``reversed_step`` cannot take the first inversion step from the clean image (noise level 1):
  it would index ``alphas_cumprod`` at a negative timestep.

Steps here: the noise levels alpha_k of states k = 1..S are those of the timesteps
``tau_k = round(k T / S) - 1`` (:func:`ddim_timesteps`), state 0 is the clean image (alpha = 1).
Decoding evaluates epsilon_theta at state k with tau_k.  Encoding evaluates it at state k with
tau_k, and with t = 0 at the clean image.  Every update is

    x0 = (x - sqrt(1 - alpha) * eps) / sqrt(alpha)
    x_next = sqrt(alpha_next) * x0 + sqrt(1 - alpha_next) * eps.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from ._checks import check_int

__all__ = ["DDIMCode", "ddim_timesteps", "ddim_encode", "ddim_decode", "ddim_reconstruct",
           "reconstruction_quality", "slerp", "ddim_interpolate", "age_direction", "manipulate_age"]


class DDIMCode(NamedTuple):
    """The two codes of a diffusion autoencoder: semantic latent and stochastic code."""

    z_sem: torch.Tensor
    """(B, latent_dim)"""
    x_T: torch.Tensor
    """(B, C, ...), model space"""


def ddim_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """Timesteps ``tau_1 < ... < tau_S`` of an S-step DDIM process, ending at ``T - 1``.

    Examples
    --------
    >>> ddim_timesteps(1000, 4)
    array([249, 499, 749, 999])
    >>> ddim_timesteps(10, 10)
    array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    check_int("num_train_timesteps", num_train_timesteps)
    check_int("steps", steps)
    if steps > num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed num_train_timesteps "
                         f"({num_train_timesteps})")
    k = np.arange(1, steps + 1)
    return np.round(k * num_train_timesteps / steps).astype(np.int64) - 1


def _levels(net, steps: int) -> tuple[np.ndarray, list[float]]:
    taus = ddim_timesteps(net.num_train_timesteps, steps)
    abar = net.alphas_cumprod.detach().cpu().double().numpy()
    return taus, [1.0] + [float(abar[t]) for t in taus]


def _move(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_next: float) -> torch.Tensor:
    x0 = (x - (1.0 - alpha) ** 0.5 * eps) / alpha ** 0.5
    return alpha_next ** 0.5 * x0 + (1.0 - alpha_next) ** 0.5 * eps


def _eps(net, x: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    timesteps = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    return net.noise_prediction(x, timesteps, z)


@torch.no_grad()
def ddim_encode(net, images: torch.Tensor, steps: int = 100,
                z_sem: torch.Tensor | None = None) -> DDIMCode:
    """Semantic latent and stochastic code of images (deterministic DDIM inversion).

    Parameters
    ----------
    net : DiffusionAE
        Used in eval mode (restored afterwards).
    images : Tensor, shape (B, C, ...)
        Prepared [0, 1] slices.
    steps : int
        DDIM steps (more steps, smaller inversion error).
    z_sem : Tensor, optional
        Semantic latents to condition on (default: ``net.encode(images)``).

    Returns
    -------
    DDIMCode
    """
    was_training = net.training
    net.eval()
    try:
        z = net.encode(images) if z_sem is None else z_sem
        taus, alphas = _levels(net, steps)
        x = net.to_model_space(images)
        evaluate_at = [0] + [int(t) for t in taus[:-1]]
        for k in range(len(taus)):
            x = _move(x, _eps(net, x, evaluate_at[k], z), alphas[k], alphas[k + 1])
    finally:
        net.train(was_training)
    return DDIMCode(z, x)


@torch.no_grad()
def ddim_decode(net, x_T: torch.Tensor, z_sem: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Images from their codes: the deterministic DDIM process from ``x_T`` to ``x_0``.

    Parameters
    ----------
    net : DiffusionAE
    x_T : Tensor, shape (B, C, ...)
        Stochastic codes (model space), e.g. from :func:`ddim_encode` or standard normal noise
        (which samples new images with the semantics of ``z_sem``).
    z_sem : Tensor, shape (B, latent_dim)
    steps : int
        Must equal the encoding's steps for a reconstruction.

    Returns
    -------
    Tensor
        Images in the [0, 1] scale of the inputs, not clipped.
    """
    was_training = net.training
    net.eval()
    try:
        taus, alphas = _levels(net, steps)
        x = x_T
        for k in range(len(taus), 0, -1):
            x = _move(x, _eps(net, x, int(taus[k - 1]), z_sem), alphas[k], alphas[k - 1])
    finally:
        net.train(was_training)
    return net.to_image_space(x)


def ddim_reconstruct(net, images: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """:func:`ddim_decode` of :func:`ddim_encode` (the autoencoder's reconstruction)."""
    code = ddim_encode(net, images, steps)
    return ddim_decode(net, code.x_T, code.z_sem, steps)


def reconstruction_quality(reconstruction: torch.Tensor, images: torch.Tensor) -> dict[str, np.ndarray]:
    """SSIM and PSNR of reconstructions against their [0, 1] images, one value per image.

    The reconstruction is clipped to [0, 1] first (the decoder's output is not), and both
    metrics use a data range of 1: MONAI's ``SSIMMetric`` (11-pixel Gaussian window,
    sigma 1.5, k1 = 0.01, k2 = 0.03, the values of Wang et al. 2004) and ``PSNRMetric``.

    Parameters
    ----------
    reconstruction, images : Tensor, shape (B, C, H, W)

    Returns
    -------
    dict
        ``{"ssim": (B,), "psnr": (B,)}`` as float64 arrays.
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    if reconstruction.shape != images.shape or reconstruction.ndim != 4:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and images "
                         f"{tuple(images.shape)} must be equal (B, C, H, W) shapes")
    recon = reconstruction.detach().float().clamp(0.0, 1.0).cpu()
    truth = images.detach().float().cpu()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(recon, truth)
    psnr = PSNRMetric(max_val=1.0, reduction="none")(recon, truth)
    return {"ssim": ssim.reshape(-1).double().numpy(), "psnr": psnr.reshape(-1).double().numpy()}


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between two tensors (flattened), ``weight`` in [0, 1].

    Gaussian codes keep their norm along the arc; linear interpolation would shrink it.

    Examples
    --------
    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> slerp(a, b, 0.5)
    tensor([0.7071, 0.7071])
    """
    flat_a, flat_b = a.reshape(-1).double(), b.reshape(-1).double()
    cos = torch.dot(flat_a, flat_b) / (flat_a.norm() * flat_b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(theta) < 1e-6:  # (anti-)parallel within rounding: the linear path is the arc
        out = (1 - weight) * flat_a + weight * flat_b
    else:
        out = (torch.sin((1 - weight) * theta) * flat_a + torch.sin(weight * theta) * flat_b) \
            / torch.sin(theta)
    return out.to(a.dtype).reshape(a.shape)


def ddim_interpolate(net, image_a: torch.Tensor, image_b: torch.Tensor,
                weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                steps: int = 100) -> torch.Tensor:
    """Images between two scans: z_sem linearly, x_T spherically interpolated, then decoded.

    The paper's appendix figure 3 shows such rows between a young and an old participant.

    Parameters
    ----------
    net : DiffusionAE
    image_a, image_b : Tensor, shape (C, ...) or (1, C, ...)
        Two prepared [0, 1] slices.
    weights : sequence of float
        Positions in [0, 1] (0: ``image_a``, 1: ``image_b``).
    steps : int

    Returns
    -------
    Tensor, shape (len(weights), C, ...)
        Decoded images, [0, 1] scale.
    """
    weights = [float(w) for w in weights]
    if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"weights must be numbers in [0, 1], got {weights}")
    pair = torch.stack([image_a.reshape(image_a.shape[-(net.spatial_dims + 1):]),
                        image_b.reshape(image_b.shape[-(net.spatial_dims + 1):])])
    code = ddim_encode(net, pair, steps)
    z = torch.stack([(1 - w) * code.z_sem[0] + w * code.z_sem[1] for w in weights])
    x_T = torch.stack([slerp(code.x_T[0], code.x_T[1], w) for w in weights])
    return ddim_decode(net, x_T, z, steps)


def age_direction(latents: torch.Tensor | np.ndarray, ages: Sequence[float],
                  ridge: float = 1e-3) -> tuple[np.ndarray, float]:
    """Direction of z_sem along which age increases: a ridge regression of age on z_sem.

    Preechakul et al. edit attributes along the weight vector of a linear model fitted on the
    semantic latents; this fits age linearly.

    Parameters
    ----------
    latents : array, shape (N, latent_dim)
        z_sem of scans with known ages (N >= 2).
    ages : sequence of float, length N
    ridge : float
        Penalty, relative to the mean variance of the centred latents (keeps the fit defined
        when N <= latent_dim).

    Returns
    -------
    (ndarray, float)
        The unit direction and the fitted years per unit of distance along it.

    Examples
    --------
    >>> z = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    >>> direction, years = age_direction(z, [20.0, 30.0, 40.0, 50.0], ridge=0.0)
    >>> direction.round(6).tolist(), round(years, 6)
    ([1.0, 0.0], 10.0)
    """
    z = np.asarray(latents.detach().cpu() if isinstance(latents, torch.Tensor) else latents,
                   dtype=np.float64)
    y = np.asarray(ages, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[0] < 2:
        raise ValueError(f"need latents (N, d) and N ages with N >= 2, got {z.shape} and "
                         f"{y.shape}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    zc, yc = z - z.mean(0), y - y.mean()
    gram = zc.T @ zc
    penalty = ridge * np.trace(gram) / z.shape[1]
    # lstsq: a minimum-norm answer also when ridge = 0 and N <= latent_dim
    w = np.linalg.lstsq(gram + penalty * np.eye(z.shape[1]), zc.T @ yc, rcond=None)[0]
    norm = float(np.linalg.norm(w))
    if not norm > 0:
        raise ValueError("age does not vary linearly with the latents (zero direction)")
    return w / norm, norm


def manipulate_age(net, image: torch.Tensor, direction, years_per_unit: float,
                   years: Sequence[float] = (-20.0, -10.0, 0.0, 10.0, 20.0),
                   steps: int = 100) -> torch.Tensor:
    """One scan made older or younger: z_sem moved along the age direction, x_T kept.

    Parameters
    ----------
    net : DiffusionAE
    image : Tensor, shape (C, ...) or (1, C, ...)
        A prepared [0, 1] slice.
    direction, years_per_unit
        From :func:`age_direction`.
    years : sequence of float
        Age changes; z_sem moves by ``years / years_per_unit`` along ``direction``.
    steps : int

    Returns
    -------
    Tensor, shape (len(years), C, ...)
        Decoded images, [0, 1] scale (0 years: the reconstruction).
    """
    if not float(years_per_unit) > 0:
        raise ValueError(f"years_per_unit must be > 0, got {years_per_unit!r}")
    one = image.reshape((1,) + tuple(image.shape[-(net.spatial_dims + 1):]))
    code = ddim_encode(net, one, steps)
    d = torch.as_tensor(np.asarray(direction), dtype=code.z_sem.dtype, device=code.z_sem.device)
    if d.shape != code.z_sem.shape[1:]:
        raise ValueError(f"direction has shape {tuple(d.shape)}, z_sem "
                         f"{tuple(code.z_sem.shape[1:])}")
    z = torch.stack([code.z_sem[0] + float(y) / float(years_per_unit) * d for y in years])
    x_T = code.x_T.expand((len(z),) + tuple(code.x_T.shape[1:]))
    return ddim_decode(net, x_T, z, steps)
