"""Network architectures of the seed models, one module per network (MONAI style)."""

from .densenet import DENSENET169_BLOCKS, LEAKY_RELU, DenseNetRegressor, densenet169_regressor

__all__ = ["DenseNetRegressor", "densenet169_regressor", "DENSENET169_BLOCKS", "LEAKY_RELU"]
