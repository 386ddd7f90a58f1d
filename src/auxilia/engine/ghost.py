"""``ghost`` mode: exact per-source statistics from per-sample gradient factors, one backward.

Per-sample gradient inner products factor through each layer's inputs and output gradients,
captured by forward hooks in the step's forward pass and one backward pass (see
:mod:`auxilia.engine.capture`). For a linear layer <G_i, G_j> = <a_i, a_j>·<b_i, b_j> (summed
over position pairs for sequences and convolutions); the N×N kernel of every layer, summed and
reduced with the N×(K+1) source indicator S as Sᵀ M S, gives the whole Gram matrix of the
present sources. Per parameter the cheaper of two exact routes is taken: that kernel (cost
~N²T²(d_in + d_out)) or materialising the gradients per sample and summing them per source
(~N·T·d_in·d_out + K²·P), so long sequences and convolutions do not pay T².

``.grad`` is then assembled without a second backward: Σ_i α_{k(i)} b_i a_iᵀ = Bᵀ diag(c) A for
linear layers (the same matrix product backward would do), ``index_add`` of c ⊙ B for
embeddings, cᵀ G for materialised gradients. Non-shared parameters (heads) get their own
sources' gradients, unweighted, from the same backward. ``dots`` and ``source_gradient`` are
exact too, so ``ghost`` provides every statistic (the target-gradient EMA and the held-out
validation row included).

Statistics are computed in the parameters' precision (float32 for float32 and 16-bit
parameters, float64 for float64) and reduced to float64; only the K×K matrix leaves the device.
``ghost(verify=False)`` skips the check against ``exact`` on the first steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.engine.capture import Capture, Step, Verifier, losses_statistic
from auxilia.engine.exact import gradient_statistics
from auxilia.engine.mode import Mode, ModeContext, Runner
from auxilia.engine.source_losses import SourceLosses
from auxilia.statistics import Need, Statistics

GRAM_NEEDS = frozenset({Need.TARGET_ROW, Need.GRAM, Need.NORMS})


@dataclass
class GhostMeasurement:
    """A step's statistics; the factors stay until the coefficients are known."""

    statistics: Statistics
    step: Step

    def combine(self, coefficients: torch.Tensor) -> None:
        """Accumulate Σ_k α_k g_k into shared ``.grad``, Σ_k g_k into the others'."""
        self.step.combine(coefficients)

    @property
    def shared(self) -> list[torch.Tensor]:
        """The shared parameters ``dots`` and ``source_gradient`` refer to, in order."""
        return self.step.shared

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """<g_k, v> for every source k, v given per shared parameter; float64 [K+1] on CPU."""
        return self.step.dots(vectors)

    def source_gradient(self, k: int) -> list[torch.Tensor]:
        """Source k's gradient on each shared parameter (zeros where it does not reach)."""
        return self.step.source_gradient(k)


class GhostRunner:
    """The ``ghost`` mode, started: hooks on the model's layers."""

    def __init__(self, context: ModeContext, *, verify: bool = True) -> None:
        self.capture = Capture(context, "ghost")
        self.verifier = Verifier(self.capture, context, verify)

    def measure(self, batch: SourceLosses, needs: frozenset[Need]) -> GhostMeasurement:
        self.capture.check(int(batch.losses.shape[0]), int(batch.present.sum()))
        reference = self.verifier.reference(batch)
        step = self.capture.collect(batch)
        if needs & GRAM_NEEDS or reference is not None:
            gram = step.gram(full=Need.GRAM in needs or reference is not None)
        else:
            gram = torch.zeros(step.width, step.width, dtype=torch.float64)
        if reference is not None:
            self.verifier.check(gram, reference)
        losses = losses_statistic(batch) if Need.LOSSES in needs else None
        # The Gram matrix is of the present sources: no absent rows to drop.
        return GhostMeasurement(gradient_statistics(batch.present, gram, losses, needs), step)

    def close(self) -> None:
        """Remove the hooks and drop recorded calls."""
        self.capture.close()


def ghost(*, verify: bool = True) -> Mode:
    """The ``ghost`` mode; ``verify``: check the first steps of each call pattern against exact."""

    def start(context: ModeContext) -> Runner:
        return GhostRunner(context, verify=verify)

    return Mode(
        name="ghost",
        summary="per-sample gradient factors from hooks, one backward pass; exact statistics",
        layouts=frozenset({"partitioned"}),
        provides=frozenset(Need),
        start=start,
        requires_module=True,
    )


GHOST = ghost()
