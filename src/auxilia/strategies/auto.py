"""``auto``: the default a user can trust without reading papers.

A source enters with full weight once the evidence says it points where the target does, and
not at all while the evidence says it does not:

    α_0 = 1,   α_k = clip(m_k / se_k, 0, 1),

with m_k the running mean of cos(g_k, g_0) over the steps source k was drawn and se_k its
standard error. Why this rule, on principle rather than on a tuned scenario:

- *Do no harm, to first order.* A source whose gradients conflict with the target's on average
  gets α = 0; every source that enters has a positive expected inner product with g_0, so the
  combined step never slows the target's descent in expectation.
- *Capture the gain.* The best fixed choice a user could make with hindsight is to train on the
  target plus the sources that help, each at weight 1 (the benchmark's oracle). A cosine gate
  (``gcs``) scales a helpful source by its cosine, often 0.1–0.3 for real data, and so gives
  away most of its benefit; here a source that reliably helps gets weight 1.
- *Noise-aware.* One step's cosine between two mini-batch gradients is noisy: it is often
  positive for a harmful source and negative for a helpful one. Weighting by how many
  standard errors the mean alignment sits above zero admits a source gradually as evidence
  accumulates and needs no threshold in the units of the gradients.
- *Scale-free and cheap.* Cosines do not depend on loss scales, and the rule needs only the
  target row and the norms, so it runs on every engine mode and layout.

The running mean and variance are exponential moving averages with rate ``rate`` (0.1, an
effective memory of about 19 draws of a source, so the gate follows a source whose usefulness
changes during training), bias-corrected like Adam's, and the standard error uses the effective
number of observations min(n_k, (2 − ρ)/ρ). With a single observation the standard error is
0 and the gate is the sign of the cosine.
"""

from __future__ import annotations

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy


def auto(rate: float = 0.1) -> Strategy:
    """α_0 = 1, α_k = clip(mean cos(g_k, g_0) / its standard error, 0, 1) (see the module)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate <= 1.0:
        raise StrategyError(f"auto: rate must be a number in (0, 1], got {rate!r}")

    def init(num_sources: int) -> State:
        zeros = torch.zeros(num_sources, dtype=torch.float64)
        return {"mean": zeros, "square": zeros.clone(), "count": zeros.clone()}

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        cos = stats.cosines().to(torch.float64)
        drawn = stats.present.clone()
        drawn[0] = False
        keep = 1.0 - rate
        mean = torch.where(drawn, keep * state["mean"] + rate * cos, state["mean"])
        square = torch.where(drawn, keep * state["square"] + rate * cos * cos, state["square"])
        count = state["count"] + drawn.to(torch.float64)
        # Bias correction: the EMAs start at 0, so divide by the weight they have gathered.
        gathered = (1.0 - keep**count).clamp_min(1e-12)
        m = mean / gathered
        variance = (square / gathered - m * m).clamp_min(0.0)
        effective = count.clamp(max=(2.0 - rate) / rate).clamp_min(1.0)
        se = (variance / effective).sqrt()
        gate = torch.where(
            se > 0, (m / se.clamp_min(1e-300)).clamp(0.0, 1.0), (m > 0).to(torch.float64)
        )
        alpha = torch.where(drawn, gate, torch.zeros_like(gate))
        alpha[0] = 1.0
        return alpha, {"mean": mean, "square": square, "count": count}

    return Strategy("auto", frozenset({Need.TARGET_ROW, Need.NORMS}), init, update, {"rate": rate})
