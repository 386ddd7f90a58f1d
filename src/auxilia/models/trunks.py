"""Built-in shared trunks (MLP, small CNN) and loading a user's trunk factory by import path."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from auxilia.errors import ConfigError


def mlp(
    input_shape: Sequence[int], hidden: Sequence[int] = (256, 256), dropout: float = 0.0
) -> nn.Module:
    """Flatten, then ``Linear-ReLU(-Dropout)`` per hidden width."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*layers)


class _Reshape(nn.Module):
    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def cnn(
    input_shape: Sequence[int],
    channels: Sequence[int] = (16, 32),
    image_shape: Sequence[int] | None = None,
    hidden: int = 128,
) -> nn.Module:
    """``Conv3x3-ReLU-MaxPool2`` per channel width, then a ``Linear-ReLU`` of width ``hidden``.

    Flat inputs are reshaped to ``image_shape`` (channels, height, width), e.g. ``(1, 28, 28)``.
    """
    shape = tuple(image_shape) if image_shape is not None else tuple(input_shape)
    if len(shape) != 3:
        raise ConfigError(
            f"model.params.image_shape: the CNN needs (channels, height, width), got {list(shape)}"
        )
    if math.prod(shape) != math.prod(input_shape):
        raise ConfigError(
            f"model.params.image_shape: {list(shape)} does not hold inputs {list(input_shape)}"
        )
    layers: list[nn.Module] = [_Reshape(shape)]
    in_channels, height, width = shape
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels, height, width = out_channels, height // 2, width // 2
    if height < 1 or width < 1:
        raise ConfigError(
            f"model.params.channels: {len(channels)} poolings shrink {list(shape)} to nothing"
        )
    layers += [nn.Flatten(), nn.Linear(in_channels * height * width, hidden), nn.ReLU()]
    return nn.Sequential(*layers)


def import_factory(path: str) -> Callable[..., Any]:
    """Resolve ``package.module:function``; errors name the part that failed."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"model.trunk: expected 'mlp', 'cnn' or 'package.module:function', got {path!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"model.trunk: cannot import module '{module_name}': {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.trunk: '{module_name}' has no callable '{attr}'")
    return factory  # type: ignore[no-any-return]
