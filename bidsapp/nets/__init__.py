"""Network architectures of the seed models, one module per network (MONAI style)."""

from .cbv_synth import CBVSynthNet, load_cbv_synth, selective_scan, synthesise_cbv
from .ddim import (DDIMCode, age_direction, ddim_decode, ddim_encode, ddim_interpolate,
                   ddim_reconstruct, ddim_timesteps, manipulate_age, reconstruction_quality,
                   slerp)
from .densenet import DENSENET169_BLOCKS, LEAKY_RELU, DenseNetRegressor, densenet169_regressor
from .diffusion_ae import (DIFFUSION_AE_AGE_HIDDEN, DIFFUSION_AE_CHANNELS, DIFFUSION_AE_SCHEDULES,
                           DiffusionAE, mc_dropout_age)
from .local_unet import (LOCAL_UNET_ACT, LocalUNet, enable_mc_dropout, local_unet_input_size,
                         local_unet_sizes)
from .mlens import (MLENS_FILTERS, MLENS_KERNELS, MLENS_LEAKY_RELU, MLENS_RELU, MLensCNN,
                    mlens_feature_shape)
from .vgg8 import VGG8, VGG8_CHANNELS, VGG8_DENSE, vgg8_feature_shape

__all__ = ["DenseNetRegressor", "densenet169_regressor", "DENSENET169_BLOCKS", "LEAKY_RELU",
           "MLensCNN", "mlens_feature_shape", "MLENS_FILTERS", "MLENS_KERNELS",
           "MLENS_LEAKY_RELU", "MLENS_RELU", "LocalUNet", "local_unet_sizes",
           "local_unet_input_size", "enable_mc_dropout", "LOCAL_UNET_ACT",
           "VGG8", "VGG8_CHANNELS", "VGG8_DENSE", "vgg8_feature_shape",
           "CBVSynthNet", "selective_scan", "synthesise_cbv", "load_cbv_synth",
           "DiffusionAE", "DIFFUSION_AE_CHANNELS", "DIFFUSION_AE_AGE_HIDDEN",
           "DIFFUSION_AE_SCHEDULES", "mc_dropout_age", "DDIMCode", "ddim_timesteps",
           "ddim_encode", "ddim_decode", "ddim_reconstruct", "reconstruction_quality", "slerp",
           "ddim_interpolate", "age_direction", "manipulate_age"]
