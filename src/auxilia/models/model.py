"""The model of a run: a shared trunk and one head per distinct output (target, tasks, datasets)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from auxilia.errors import ConfigError
from auxilia.models.trunks import cnn, import_factory, mlp

BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}


class AuxModel(nn.Module):
    """A shared ``trunk`` producing features and named linear ``heads`` on top of them."""

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of ``x`` from the shared trunk."""
        out: torch.Tensor = self.trunk(x)
        return out


def build_trunk(
    trunk: str | nn.Module, input_shape: Sequence[int], params: Mapping[str, Any]
) -> nn.Module:
    """A built-in trunk by name, a factory by ``package.module:function``, or a module as given.

    Factories are called with ``input_shape=`` plus ``params`` and must return an ``nn.Module``
    that maps a batch of inputs to a batch of feature vectors.
    """
    if isinstance(trunk, nn.Module):
        return trunk
    factory = BUILTIN.get(trunk) or import_factory(trunk)
    try:
        module = factory(input_shape=tuple(input_shape), **dict(params))
    except TypeError as error:
        raise ConfigError(f"model: cannot build trunk '{trunk}': {error}") from error
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"model.trunk: '{trunk}' returned {type(module).__name__}, not an nn.Module"
        )
    return module


def feature_width(trunk: nn.Module, example: torch.Tensor) -> int:
    """Width of the trunk's features, found by one forward pass on ``example`` (one sample).

    The pass runs in eval mode: batch normalisation of one sample fails in training mode (and
    would move its running statistics), dropout would draw from the run's random stream."""
    training = trunk.training
    trunk.eval()
    with torch.no_grad():
        try:
            out = trunk(example.unsqueeze(0))
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise ConfigError(
                f"model: the trunk cannot process inputs of shape {tuple(example.shape)}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else repr(error)}"
            ) from error
        finally:
            trunk.train(training)
    if out.dim() != 2:
        raise ConfigError(
            f"model: the trunk must output (batch, features), got shape {tuple(out.shape)}"
        )
    return int(out.shape[1])


def build_model(
    trunk: nn.Module, example: torch.Tensor, head_outputs: Mapping[str, int]
) -> AuxModel:
    """Attach one ``Linear`` head per entry of ``head_outputs`` (name -> output width)."""
    width = feature_width(trunk, example)
    return AuxModel(trunk, {name: nn.Linear(width, out) for name, out in head_outputs.items()})
