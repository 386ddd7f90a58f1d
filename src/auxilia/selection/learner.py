"""What selection needs of a model: per-sample losses through a head, a representation, and
which parameters a sample's gradient is compared on.

:class:`ClassifierLearner` wraps the trainer's model (a trunk with one linear head per output);
:class:`~auxilia.selection.language.LanguageModelLearner` wraps a causal language model. Scoring
methods see only this interface, so they work for any model family.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from auxilia.models import AuxModel


class Learner(Protocol):
    """A model as selection sees it; ``head`` is the head a pool's samples go through."""

    module: nn.Module

    def losses(self, x: torch.Tensor, y: torch.Tensor, head: str) -> torch.Tensor:
        """One loss per sample ([N]), differentiable."""
        ...

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """[N, d] features of the samples (the trunk's output)."""
        ...

    def compared(self, head: str, *, encoder_only: bool = False) -> list[nn.Parameter]:
        """The parameters a sample of ``head`` is compared with the target on: those both
        reach (the encoder and, when ``head`` is the target's, that head)."""
        ...

    def clone(self, state: Mapping[str, torch.Tensor] | None = None) -> Learner:
        """An independent copy (its own module), with ``state`` loaded when given."""
        ...


class ClassifierLearner:
    """A trunk with linear heads (:class:`~auxilia.models.AuxModel`); classification losses
    (cross-entropy) or regression (squared error) per head."""

    def __init__(self, model: AuxModel, target: str, kinds: Mapping[str, str]) -> None:
        self.module: nn.Module = model
        self.model = model
        self.target = target
        self.kinds = dict(kinds)

    def losses(self, x: torch.Tensor, y: torch.Tensor, head: str) -> torch.Tensor:
        out: torch.Tensor = self.model.heads[head](self.model(x))
        if self.kinds[head] == "classification":
            losses: torch.Tensor = F.cross_entropy(out, y, reduction="none")
            return losses
        target = y.reshape(out.shape).to(out.dtype)
        return ((out - target) ** 2).reshape(out.shape[0], -1).mean(dim=1)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out.reshape(out.shape[0], -1)

    def compared(self, head: str, *, encoder_only: bool = False) -> list[nn.Parameter]:
        params = [p for p in self.model.trunk.parameters() if p.requires_grad]
        if head == self.target and not encoder_only:
            params += [p for p in self.model.heads[head].parameters() if p.requires_grad]
        return params

    def clone(self, state: Mapping[str, torch.Tensor] | None = None) -> ClassifierLearner:
        model = copy.deepcopy(self.model)
        if state is not None:
            model.load_state_dict(state)
        return ClassifierLearner(model, self.target, self.kinds)
