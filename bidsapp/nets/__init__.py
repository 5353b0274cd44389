"""Network architectures of the seed models, one module per network (MONAI style)."""

from .densenet import DENSENET169_BLOCKS, LEAKY_RELU, DenseNetRegressor, densenet169_regressor
from .mlens import (MLENS_FILTERS, MLENS_KERNELS, MLENS_LEAKY_RELU, MLENS_RELU, MLensCNN,
                    mlens_feature_shape)

__all__ = ["DenseNetRegressor", "densenet169_regressor", "DENSENET169_BLOCKS", "LEAKY_RELU",
           "MLensCNN", "mlens_feature_shape", "MLENS_FILTERS", "MLENS_KERNELS",
           "MLENS_LEAKY_RELU", "MLENS_RELU"]
