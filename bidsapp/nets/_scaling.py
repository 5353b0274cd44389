"""Output scaling shared by the regression networks: ``age = target_offset + target_scale * raw``.

The offset and scale (e.g. mean and SD of the training ages) are buffers, so they travel with
the weights in every checkpoint and a network predicts years without outside information.
"""

from __future__ import annotations

import torch

__all__ = ["TargetScaling"]


class TargetScaling:
    """Mixin of an ``nn.Module`` whose outputs are ``target_offset + target_scale * raw``.

    Examples
    --------
    >>> from torch import nn
    >>> class Net(TargetScaling, nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_target_scaling(40.0, 10.0)
    >>> net = Net()
    >>> float(net.scaled(torch.tensor(0.5)))
    45.0
    >>> sorted(net.state_dict())
    ['target_offset', 'target_scale']
    """

    def register_target_scaling(self, offset: float, scale: float) -> None:
        """Create the two buffers (call once in ``__init__``); ``scale`` must be > 0."""
        if not float(scale) > 0:
            raise ValueError(f"target_scale must be > 0, got {scale!r}")
        self.register_buffer("target_offset", torch.tensor(float(offset)))
        self.register_buffer("target_scale", torch.tensor(float(scale)))

    def set_target_scaling(self, offset: float, scale: float) -> None:
        """Set the output offset and scale (e.g. mean and SD of the training ages)."""
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.target_offset.fill_(float(offset))
        self.target_scale.fill_(float(scale))

    def scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """``target_offset + target_scale * raw``."""
        return self.target_offset + self.target_scale * raw
