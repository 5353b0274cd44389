"""Semi-supervised diffusion autoencoder of seed 001 (Ijishakin et al., brain age from 2D T1w).

Three networks, trained jointly (section 3 and appendices C-D of the paper):

* the **noise predictor** epsilon_theta(x_t, t, z_sem): a U-Net.  Channel plan
  ``(32, 32, 64, 96, 128)`` (multipliers 1, 1, 2, 3, 4 of a base width of 32), GroupNorm and
  SiLU before every convolution, skip connections between the levels of equal width, three
  self-attention blocks over the flattened bottleneck in the middle, and an up path that mirrors
  the down path;
* the **semantic encoder** s_phi(x_0): the same down path and middle block, without time
  conditioning, then GroupNorm, SiLU, global average pooling and a linear map to the
  512-d semantic latent z_sem;
* the **age predictor** f_psi(z_sem): an MLP 512 -> 128 -> 32 -> 1, with ReLU, batch
  normalisation and dropout 0.5 between the layers.

The loss is the noise MSE of eq. 4, with z_sem as an extra input of the noise predictor, plus
the age MSE of eq. 6 (:meth:`DiffusionAE.training_losses`).  Scans without an age contribute the
diffusion term only, which makes the model semi-supervised.

**How the paper's description is read.**  Appendix C describes each level as "three
convolutional layers" and gives 10.12 M parameters.  A plain U-Net of these widths with three
convolutions per level has only about 3.4 M parameters, so both statements cannot hold for
that design.  The paper builds on the diffusion autoencoder of Preechakul et al. (its
reference 17).  That model's 128^2 configuration uses channel multipliers (1, 1, 2, 3, 4), two
residual blocks per level, residual blocks that also do the down- and upsampling, and 512-d
embeddings.  Built from MONAI's blocks at a base width of 32, that structure has 9.59 M
parameters here, so it is used: ``num_res_blocks = 2``, ``resblock_updown = True``,
``embed_dim = 512``.  Every one of these is a constructor argument, so a network closer to
the paper's literal description can be built too (e.g. ``num_res_blocks = 1``).

**MONAI and this module.**  The noise predictor is built from MONAI's diffusion U-Net blocks:
``DownBlock``, ``UpBlock`` and ``DiffusionUNetResnetBlock`` (GroupNorm, SiLU, convolution,
with the time embedding added inside every residual block), ``get_timestep_embedding``, and
the noise schedule of :class:`monai.networks.schedulers.DDPMScheduler`.  Four parts are this
module's own, each for the reason given:

* :class:`monai.networks.nets.DiffusionModelUNet` itself is not used.  Its middle block always
  contains MONAI's ``SpatialAttentionBlock``, which needs ``einops``, and ``einops`` is not a
  dependency of this app.  That middle block also has one attention block, where the paper has
  three.
* The attention block (:class:`_SelfAttention`) is written with
  :func:`torch.nn.functional.scaled_dot_product_attention`, for the same reason.
* The conditioning on z_sem is continuous.  MONAI offers two kinds of conditioning.
  ``class_labels`` selects from a discrete ``nn.Embedding``.  Cross-attention ``context`` acts
  only in the attention levels and needs ``einops`` too.  So z_sem is mapped linearly to the
  embedding width and added to the time embedding.  That is how MONAI adds its class
  embedding, and it reaches every residual block at every time step.  Preechakul et al. scale
  the normalised features by a projection of z_sem instead (adaptive GroupNorm); the additive
  form is simpler, and the paper does not say which form it used.
* The residual blocks of the semantic encoder (:class:`_PlainResBlock`) have no time input.
  MONAI's residual block requires an embedding.

The diffusion runs on images scaled to [-1, 1].  The public methods take and return the
prepared [0, 1] slices (:mod:`bidsapp.transforms.mni_slice`) and convert internally.  The age
output is ``target_offset + target_scale * f_psi(z_sem)``, as in the package's other networks,
so :meth:`DiffusionAE.forward` maps images to years and the training engine's generic
validation and export work unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from monai.networks.nets.diffusion_model_unet import (DiffusionUNetResnetBlock,
                                                      DiffusionUnetDownsample, DownBlock, UpBlock,
                                                      get_timestep_embedding, zero_module)
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from ._checks import check_int, check_net_args
from ._scaling import TargetScaling

__all__ = ["DiffusionAE", "DIFFUSION_AE_CHANNELS", "DIFFUSION_AE_AGE_HIDDEN",
           "DIFFUSION_AE_SCHEDULES", "mc_dropout_age"]

#: Widths of the U-Net levels (appendix C: 32 and multipliers 1, 1, 2, 3, 4).
DIFFUSION_AE_CHANNELS = (32, 32, 64, 96, 128)
#: Hidden widths of the age MLP f_psi (512 -> 128 -> 32 -> 1).
DIFFUSION_AE_AGE_HIDDEN = (128, 32)
#: Noise schedules of MONAI's schedulers that take ``beta_start`` and ``beta_end``.
DIFFUSION_AE_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta")


class _SelfAttention(nn.Module):
    """GroupNorm, multi-head self-attention over the flattened positions, residual.

    The output projection starts at zero, so an untrained block passes its input through
    unchanged (as the diffusion U-Nets of Ho et al. and Preechakul et al. do).
    """

    def __init__(self, channels: int, head_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).reshape(b, -1, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        out = self.proj(out.transpose(1, 2).reshape(b, -1, c))
        return x + out.transpose(1, 2).reshape(x.shape)


class _PlainResBlock(nn.Module):
    """MONAI's diffusion residual block without the time embedding (semantic encoder).

    GroupNorm, SiLU, 3^d convolution, twice, plus the input (1^d convolution where the width
    changes); ``down`` average-pools both branches after the first activation.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, groups: int,
                 eps: float, down: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3,
                                 conv_only=True)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3,
                                 conv_only=True)
        self.down = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2) if down else None
        self.skip = (nn.Identity() if in_channels == out_channels else
                     Convolution(spatial_dims, in_channels, out_channels, kernel_size=1,
                                 conv_only=True))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.down is not None:
            x, h = self.down(x), self.down(h)
        h = self.conv2(F.silu(self.norm2(self.conv1(h))))
        return self.skip(x) + h


class _MiddleBlock(nn.Module):
    """Residual block, ``n_attention`` self-attention blocks, residual block."""

    def __init__(self, res1: nn.Module, res2: nn.Module, channels: int, n_attention: int,
                 head_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.resnet_1, self.resnet_2 = res1, res2
        self.attention = nn.ModuleList(_SelfAttention(channels, head_channels, groups, eps)
                                       for _ in range(n_attention))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        x = self.resnet_1(x, emb)
        for block in self.attention:
            x = block(x)
        return self.resnet_2(x, emb)


class _NoisePredictor(nn.Module):
    """epsilon_theta(x_t, t, z_sem): MONAI's diffusion U-Net blocks, conditioned on z_sem."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: tuple[int, ...],
                 num_res_blocks: int, resblock_updown: bool, attention_blocks: int,
                 head_channels: int, groups: int, eps: float, embed_dim: int,
                 latent_dim: int) -> None:
        super().__init__()
        self.base = channels[0]
        self.conv_in = Convolution(spatial_dims, in_channels, channels[0], kernel_size=3,
                                   conv_only=True)
        self.time_embed = nn.Sequential(nn.Linear(channels[0], embed_dim), nn.SiLU(),
                                        nn.Linear(embed_dim, embed_dim))
        # z_sem joins the time embedding, as MONAI's class embedding does (see module docstring)
        self.cond_embed = nn.Linear(latent_dim, embed_dim)
        common = dict(spatial_dims=spatial_dims, temb_channels=embed_dim, norm_num_groups=groups,
                      norm_eps=eps, resblock_updown=resblock_updown)
        self.down_blocks = nn.ModuleList()
        previous = channels[0]
        for i, width in enumerate(channels):
            self.down_blocks.append(DownBlock(in_channels=previous, out_channels=width,
                                              num_res_blocks=num_res_blocks,
                                              add_downsample=i < len(channels) - 1, **common))
            previous = width

        def res(c):
            return DiffusionUNetResnetBlock(spatial_dims, c, embed_dim, c, norm_num_groups=groups,
                                            norm_eps=eps)

        self.middle_block = _MiddleBlock(res(previous), res(previous), previous, attention_blocks,
                                         head_channels, groups, eps)
        # the mirror path, wired as in MONAI's DiffusionModelUNet: each level concatenates the
        # skips of the equal-width down level (one more residual block than on the way down)
        reverse = list(reversed(channels))
        self.up_blocks = nn.ModuleList()
        for i, width in enumerate(reverse):
            self.up_blocks.append(UpBlock(in_channels=reverse[min(i + 1, len(channels) - 1)],
                                          prev_output_channel=previous, out_channels=width,
                                          num_res_blocks=num_res_blocks + 1,
                                          add_upsample=i < len(channels) - 1, **common))
            previous = width
        self.out = nn.Sequential(
            nn.GroupNorm(groups, channels[0], eps=eps), nn.SiLU(),
            zero_module(Convolution(spatial_dims, channels[0], in_channels, kernel_size=3,
                                    conv_only=True)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        emb = get_timestep_embedding(timesteps, self.base).to(dtype=x.dtype)
        emb = self.time_embed(emb) + self.cond_embed(z.to(dtype=x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(hidden_states=h, temb=emb)
            skips.extend(states)
        h = self.middle_block(h, emb)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(hidden_states=h, res_hidden_states_list=skips[-n:], temb=emb)
            skips = skips[:-n]
        return self.out(h)


class _SemanticEncoder(nn.Module):
    """s_phi(x_0): the down path and middle block without time input, pooled to z_sem."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: tuple[int, ...],
                 num_res_blocks: int, resblock_updown: bool, attention_blocks: int,
                 head_channels: int, groups: int, eps: float, latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [Convolution(spatial_dims, in_channels, channels[0],
                                               kernel_size=3, conv_only=True)]
        previous = channels[0]
        for i, width in enumerate(channels):
            for _ in range(num_res_blocks):
                layers.append(_PlainResBlock(spatial_dims, previous, width, groups, eps))
                previous = width
            if i < len(channels) - 1:
                layers.append(_PlainResBlock(spatial_dims, width, width, groups, eps, down=True)
                              if resblock_updown else
                              DiffusionUnetDownsample(spatial_dims, width, use_conv=True))
        self.down = nn.ModuleList(layers)
        self.middle_block = _MiddleBlock(
            _PlainResBlock(spatial_dims, previous, previous, groups, eps),
            _PlainResBlock(spatial_dims, previous, previous, groups, eps), previous,
            attention_blocks, head_channels, groups, eps)
        self.out = nn.Sequential(nn.GroupNorm(groups, previous, eps=eps), nn.SiLU(),
                                 Pool[Pool.ADAPTIVEAVG, spatial_dims](1), nn.Flatten(1),
                                 nn.Linear(previous, latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down[0](x)
        for layer in self.down[1:]:
            h = layer(h)
        return self.out(self.middle_block(h, None))


def _age_mlp(latent_dim: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    """f_psi: Linear, then ReLU, batch norm and dropout between consecutive layers."""
    layers: list[tuple[str, nn.Module]] = []
    width = latent_dim
    for i, units in enumerate(hidden):
        layers += [(f"dense{i}", nn.Linear(width, units)), (f"act{i}", nn.ReLU()),
                   (f"norm{i}", nn.BatchNorm1d(units)), (f"drop{i}", nn.Dropout(dropout))]
        width = units
    layers.append(("out", nn.Linear(width, 1)))
    return nn.Sequential(OrderedDict(layers))


class DiffusionAE(TargetScaling, nn.Module):
    """Diffusion autoencoder with an age head: epsilon_theta, s_phi and f_psi (seed 001).

    Based on Ijishakin et al., "Semi-supervised diffusion model for brain age prediction"
    (2023), after Preechakul et al., `Diffusion autoencoders
    <https://arxiv.org/abs/2111.15640>`_.  The module docstring explains how the paper's text
    is read.

    Args:
        spatial_dims: 2 (the paper's axial slices) or 3.
        in_channels: image channels (1: T1w).
        channels: widths of the U-Net levels; each must be a multiple of ``norm_num_groups``.
            An input side must be divisible by ``2 ** (len(channels) - 1)``.
        num_res_blocks: residual blocks per down level (the up levels have one more).
        resblock_updown: down- and upsample with residual blocks (else strided convolution and
            nearest-neighbour upsampling followed by a convolution).
        attention_blocks: self-attention blocks in the middle (paper: 3).
        attention_head_channels: channels per attention head; must divide ``channels[-1]``.
        norm_num_groups, norm_eps: GroupNorm settings.
        embed_dim: width of the time (+ z_sem) embedding.
        latent_dim: size of z_sem (paper: 512).
        age_hidden: hidden widths of f_psi (paper: 128, 32).
        age_dropout: dropout between the layers of f_psi (paper: 0.5); it is also the source
            of the Monte-Carlo interval of :func:`mc_dropout_age`.
        num_train_timesteps, beta_schedule, beta_start, beta_end: the DDPM noise schedule
            (MONAI's :class:`~monai.networks.schedulers.DDPMScheduler`; the paper does not
            state its schedule, so the default is the linear one of Ho et al.).
        target_offset, target_scale: ages are ``offset + scale * f_psi(z_sem)``.

    Examples::

        >>> net = DiffusionAE(channels=(8, 8, 16), norm_num_groups=8, embed_dim=16,
        ...                   latent_dim=16, attention_head_channels=8,
        ...                   age_hidden=(8, 4)).eval()
        >>> x = torch.rand(2, 1, 32, 32)
        >>> net(x).shape, net.encode(x).shape
        (torch.Size([2, 1]), torch.Size([2, 16]))
        >>> t = torch.tensor([0, 999])
        >>> net.noise_prediction(2 * x - 1, t, net.encode(x)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1,
                 channels: Sequence[int] = DIFFUSION_AE_CHANNELS, num_res_blocks: int = 2,
                 resblock_updown: bool = True, attention_blocks: int = 3,
                 attention_head_channels: int = 32, norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, embed_dim: int = 512, latent_dim: int = 512,
                 age_hidden: Sequence[int] = DIFFUSION_AE_AGE_HIDDEN, age_dropout: float = 0.5,
                 num_train_timesteps: int = 1000, beta_schedule: str = "linear_beta",
                 beta_start: float = 1e-4, beta_end: float = 2e-2, target_offset: float = 0.0,
                 target_scale: float = 1.0) -> None:
        super().__init__()
        check_net_args(spatial_dims, in_channels=in_channels, num_res_blocks=num_res_blocks,
                       attention_head_channels=attention_head_channels,
                       norm_num_groups=norm_num_groups, embed_dim=embed_dim,
                       latent_dim=latent_dim, num_train_timesteps=num_train_timesteps)
        check_int("attention_blocks", attention_blocks, 0)
        channels, age_hidden = tuple(channels), tuple(age_hidden)
        if not channels:
            raise ValueError("channels must name at least one U-Net level")
        for i, c in enumerate(channels):
            check_int(f"channels[{i}]", c)
            if c % norm_num_groups:
                raise ValueError(f"channels[{i}] = {c} is not a multiple of norm_num_groups "
                                 f"({norm_num_groups})")
        if channels[-1] % attention_head_channels:
            raise ValueError(f"attention_head_channels ({attention_head_channels}) must divide "
                             f"the bottleneck width channels[-1] = {channels[-1]}")
        for i, units in enumerate(age_hidden):
            check_int(f"age_hidden[{i}]", units)
        if not isinstance(resblock_updown, bool):
            raise TypeError(f"resblock_updown must be a bool, got {resblock_updown!r}")
        if not 0.0 <= float(age_dropout) < 1.0:
            raise ValueError(f"age_dropout must be in [0, 1), got {age_dropout!r}")
        if not float(norm_eps) > 0:
            raise ValueError(f"norm_eps must be > 0, got {norm_eps!r}")
        if beta_schedule not in DIFFUSION_AE_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {DIFFUSION_AE_SCHEDULES}, got "
                             f"{beta_schedule!r}")
        if not 0.0 < float(beta_start) < float(beta_end) < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start!r}, "
                             f"{beta_end!r}")

        self.spatial_dims, self.channels = spatial_dims, channels
        self.latent_dim, self.num_train_timesteps = latent_dim, num_train_timesteps
        common = dict(spatial_dims=spatial_dims, in_channels=in_channels, channels=channels,
                      num_res_blocks=num_res_blocks, resblock_updown=resblock_updown,
                      attention_blocks=attention_blocks, head_channels=attention_head_channels,
                      groups=norm_num_groups, eps=float(norm_eps))
        self.noise_net = _NoisePredictor(embed_dim=embed_dim, latent_dim=latent_dim, **common)
        self.encoder = _SemanticEncoder(latent_dim=latent_dim, **common)
        self.age_head = _age_mlp(latent_dim, age_hidden, float(age_dropout))
        # clip_sample=False: the schedule is only used to noise x_0 (add_noise), never clipped
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                       schedule=beta_schedule, beta_start=float(beta_start),
                                       beta_end=float(beta_end), clip_sample=False)
        # float64 copy for DDIM (bidsapp.nets.ddim): not saved, rebuilt from the arguments
        self.register_buffer("alphas_cumprod",
                             self.scheduler.alphas_cumprod.to(torch.float64), persistent=False)
        self.register_target_scaling(target_offset, target_scale)

    # ------------------------------------------------------------------ the three networks
    @property
    def downsampling(self) -> int:
        """Every input side must be a multiple of this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.channels) - 1)

    def _check_input(self, x: torch.Tensor) -> None:
        sides = tuple(x.shape[2:])
        if x.ndim != self.spatial_dims + 2 or any(s % self.downsampling for s in sides):
            raise ValueError(f"expected (batch, channels, {self.spatial_dims} sides divisible by "
                             f"{self.downsampling}), got shape {tuple(x.shape)}")

    @staticmethod
    def to_model_space(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images to the [-1, 1] range the diffusion runs in."""
        return 2.0 * images - 1.0

    @staticmethod
    def to_image_space(x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_model_space` (no clipping)."""
        return (x + 1.0) / 2.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z_sem = s_phi(x_0) of [0, 1] images, shape ``(batch, latent_dim)``."""
        self._check_input(images)
        return self.encoder(self.to_model_space(images))

    def age_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Ages (years) f_psi(z_sem), scaled by the output offset and scale, ``(batch, 1)``."""
        return self.scaled(self.age_head(z))

    def noise_prediction(self, x_t: torch.Tensor, timesteps: torch.Tensor,
                         z: torch.Tensor) -> torch.Tensor:
        """epsilon_theta(x_t, t, z_sem) for noisy images in model space ([-1, 1] at t = 0)."""
        self._check_input(x_t)
        return self.noise_net(x_t, timesteps, z)

    def forward(self, images: torch.Tensor, ages: torch.Tensor | None = None):
        """Predicted ages ``(batch, 1)`` of [0, 1] images, or with ``ages`` the training losses.

        The second form goes through ``forward`` so that a DistributedDataParallel wrapper
        sees the whole computation; see :meth:`training_losses`.
        """
        if ages is not None:
            return self.training_losses(images, ages)
        return self.age_from_latent(self.encode(images))

    # ------------------------------------------------------------------ training
    def training_losses(self, images: torch.Tensor, ages: torch.Tensor,
                        timesteps: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The two terms of the paper's objective for one batch.

        Parameters
        ----------
        images : Tensor, shape (B, C, ...)
            Prepared slices in [0, 1].
        ages : Tensor, shape (B,) or (B, 1)
            Ages in years; NaN marks a scan without an age.
        timesteps, noise : Tensor, optional
            The diffusion step of each scan (uniform over the schedule when omitted) and the
            Gaussian noise (standard normal when omitted); both come from torch's global
            generator, which the training engine seeds and checkpoints.

        Returns
        -------
        dict of str to Tensor
            ``diffusion``: the mean over scans and pixels of ``(epsilon_theta(x_t, t, z_sem) -
            epsilon)^2`` (eq. 4, one sampled t per scan); ``age``: the mean over the scans with
            an age of ``((f_psi(z_sem) - age) / target_scale)^2`` (eq. 6, in units of the
            output scale; exactly 0, with zero gradient, when no scan has an age);
            ``n_labelled``: the number of scans with an age.

        Notes
        -----
        f_psi runs on every scan of the batch, so its batch normalisation sees them all; a
        scan without an age adds nothing to the age term.  The NaN targets are replaced
        before the error is formed, so they cannot reach the gradients (0 * NaN is NaN).
        """
        ages = ages.reshape(-1).to(images.device, torch.float32)
        if ages.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {ages.shape[0]} ages")
        x0 = self.to_model_space(images)
        self._check_input(x0)
        z = self.encoder(x0)
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (x0.shape[0],),
                                      device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        eps = self.noise_net(x_t, timesteps, z)
        diffusion = torch.mean((eps.float() - noise.float()) ** 2)
        predicted = self.age_from_latent(z)[:, 0].float()
        labelled = torch.isfinite(ages)
        target = torch.where(labelled, ages, predicted.detach())
        squared = ((predicted - target) / self.target_scale) ** 2
        n = labelled.sum()
        age = torch.sum(torch.where(labelled, squared, torch.zeros_like(squared))) / n.clamp(min=1)
        return {"diffusion": diffusion, "age": age, "n_labelled": n}


@torch.no_grad()
def mc_dropout_age(net: DiffusionAE, images: torch.Tensor, samples: int = 50,
                   level: float = 0.95, generator: torch.Generator | None = None
                   ) -> dict[str, np.ndarray]:
    """Monte-Carlo dropout interval of the predicted ages (dropout of f_psi on, batch norm off).

    z_sem is computed once per image (the encoder has no dropout).  ``samples`` passes of f_psi
    are then made with its dropout layers active and its batch norm on the running
    statistics.  The interval is formed from the quantiles of those passes.

    Parameters
    ----------
    net : DiffusionAE
    images : Tensor, shape (B, C, ...)
        Prepared [0, 1] slices.
    samples : int
        Dropout passes (>= 2).
    level : float
        Coverage of the central interval, in (0, 1).
    generator : torch.Generator, optional
        Makes the dropout masks reproducible (the global generator is left untouched).

    Returns
    -------
    dict of str to ndarray, each of shape (B,)
        ``mean`` (the point estimate, the mean of the passes), ``sd``, ``lower`` and
        ``upper`` (the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles), and
        ``deterministic`` (dropout off).

    Raises
    ------
    ValueError
        For fewer than 2 samples, a level outside (0, 1), or a network without dropout.
    """
    check_int("samples", samples, 2)
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    drops = [m for m in net.age_head if isinstance(m, nn.Dropout)]
    if not any(m.p > 0 for m in drops):
        raise ValueError("the age head has no dropout (age_dropout = 0): no Monte-Carlo interval")
    was_training = net.training
    net.eval()
    try:
        z = net.encode(images)
        deterministic = net.age_from_latent(z)[:, 0]
        draws = []
        for _ in range(samples):
            h = z
            for layer in net.age_head:
                if isinstance(layer, nn.Dropout) and layer.p > 0:
                    # the same Bernoulli mask torch's dropout draws, from our own generator
                    keep = torch.rand(h.shape, generator=generator, device="cpu").to(h.device)
                    h = h * (keep >= layer.p).to(h.dtype) / (1.0 - layer.p)
                else:
                    h = layer(h)
            draws.append(net.scaled(h)[:, 0])
        stack = torch.stack(draws).double()
    finally:
        net.train(was_training)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=stack.device)
    lower, upper = torch.quantile(stack, q, dim=0)
    return {"mean": stack.mean(0).cpu().numpy(), "sd": stack.std(0).cpu().numpy(),
            "lower": lower.cpu().numpy(), "upper": upper.cpu().numpy(),
            "deterministic": deterministic.double().cpu().numpy()}
