"""``auto``: the default a user can trust without reading papers.

A source enters with full weight once the evidence says it points where the target does, and
not at all while the evidence says it does not:

    α_0 = 1,   α_k = clip(m_k / se_k, 0, 1),

with m_k the running mean of cos(g_k, g_0) over the steps source k was drawn and se_k its
standard error. Each step's cosine counts as evidence in proportion to how much of the
target's gradient is signal (below). Why this rule, on principle rather than on a tuned
scenario:

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
- *Evidence only from a target gradient that carries signal.* Once the few target labels are
  fit, g_0 is mostly mini-batch noise, and a cosine against noise says nothing about a source;
  an unweighted running mean would let those steps wash out what was learnt while the target
  was still learning. The signal fraction of g_0 is read from the engine's moving average ĝ
  of the target gradient: r = ‖ĝ‖ / n̄ (n̄ the moving average of ‖g_0‖) is 1 when successive
  target gradients agree and sqrt(ρ / (2 − ρ)) in expectation when they are independent noise
  (an EMA of i.i.d. vectors); the step's evidence weight is w = clip((r − r_0) / (1 − r_0), 0,
  1) with r_0 that noise level, so pure-noise steps leave the evidence as it was.
- *Scale-free and cheap.* Cosines and r do not depend on loss scales; the rule needs the
  target row, the norms and ‖ĝ‖ (the engine keeps ĝ, one parameter-sized buffer, but takes no
  inner products with it: ``Need.TARGET_EMA_NORM``), no Gram matrix.

``variant="projection"`` reads each step's evidence as <g_k, g_0> / ‖g_0‖, the component of
g_k along the target's direction, instead of the cosine: the same test (is the mean
significantly positive?), still scale-free per source, and without the norms ‖g_k‖. It exists
for the shared-input layout (K task heads on one batch), where the norms need each task's own
backward pass (the ``batched`` mode, K + 1 passes) while the target row and ‖ĝ‖ come from the
``jvp`` mode at a cost flat in K. It weights steps by ‖g_k‖ where the cosine does not, which
measured slightly worse on the quality benchmark (BENCHMARKS.md), so ``cosine`` stays the
default.

The running mean and variance are exponential moving averages with rate ρ·w (``rate`` ρ =
0.1, an effective memory of about 19 fully weighted draws of a source, so the gate follows a
source whose usefulness changes during training), normalised by the weight they have gathered
(Adam's bias correction), and the standard error uses their effective number of observations
(Kish: (Σ weights)² / Σ weights², which is min(n, (2 − ρ)/ρ) when every w is 1). With a single
observation the standard error is 0 and the gate is the sign of the cosine; a source with no
weighted evidence yet gets 0. ĝ and n̄ use the same rate ρ.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy

F64 = torch.float64
Variant = Literal["cosine", "projection"]


def signal_weight(ema_norm: float, mean_norm: float, rate: float) -> float:
    """w = clip((r − r_0) / (1 − r_0), 0, 1), r = ‖ĝ‖ / n̄, r_0 = sqrt(ρ / (2 − ρ)) (see the module).

    ``rate`` 1 keeps no history (ĝ = g_0): every step then counts fully.
    """
    if rate >= 1.0:
        return 1.0
    if not mean_norm > 0.0:
        return 0.0
    noise = math.sqrt(rate / (2.0 - rate))
    ratio = ema_norm / mean_norm
    return min(1.0, max(0.0, (ratio - noise) / (1.0 - noise)))


def auto(rate: float = 0.1, variant: Variant = "cosine") -> Strategy:
    """α_0 = 1, α_k = clip(mean cos(g_k, g_0) / its standard error, 0, 1), evidence weighted by
    the signal fraction of the target's gradient; ``projection``: <g_k, g_0> / ‖g_0‖ in place
    of the cosine, no norms needed (see the module)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate <= 1.0:
        raise StrategyError(f"auto: rate must be a number in (0, 1], got {rate!r}")
    if variant not in ("cosine", "projection"):
        raise StrategyError(f"auto: variant must be 'cosine' or 'projection', got {variant!r}")

    def init(num_sources: int) -> State:
        zeros = torch.zeros(num_sources, dtype=F64)
        return {
            "mean": zeros,  # EMA of w·x, x the step's evidence (un-normalised)
            "square": zeros.clone(),  # EMA of w·x²
            "weight": zeros.clone(),  # the weight the EMAs have gathered
            "weight_sq": zeros.clone(),  # the discounted sum of squared weights (Kish)
            "target_norm": torch.zeros(2, dtype=F64),  # EMA of ‖g_0‖, target steps seen
        }

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        if variant == "cosine":
            evidence = stats.cosines().to(F64)  # per source
            target_norm = float(stats.require(Need.NORMS)[0])
        else:
            row = stats.require(Need.TARGET_ROW).to(F64)
            target_norm = math.sqrt(max(float(row[0]), 0.0))  # <g_0, g_0>
            evidence = row / target_norm if target_norm > 0.0 else torch.zeros_like(row)
        sqnorm = stats.ema_sqnorm
        if sqnorm is None:
            raise ValueError("statistic 'ema_sqnorm' was not computed")
        level, seen = state["target_norm"].tolist()
        if bool(stats.present[0]):
            level, seen = (1.0 - rate) * level + rate * target_norm, seen + 1.0
        mean_norm = level / (1.0 - (1.0 - rate) ** seen) if seen else 0.0
        step_rate = rate * signal_weight(math.sqrt(float(sqnorm)), mean_norm, rate)
        drawn = stats.present.clone()
        drawn[0] = False
        # Where drawn, each EMA moves by the step's rate r: x ← x + r (new − x) (a lerp), the
        # squared-weight sum by (1 − r)² x + r². Few, fused operations: the update runs every
        # step, on vectors of K+1 entries, where each operation's fixed cost is what counts.
        moved = drawn.to(F64).mul_(step_rate)
        mean = torch.lerp(state["mean"], evidence, moved)
        square = torch.lerp(state["square"], evidence * evidence, moved)
        weight = torch.lerp(state["weight"], torch.ones_like(evidence), moved)
        keep = 1.0 - step_rate
        weight_sq = torch.where(
            drawn, state["weight_sq"] * (keep * keep) + step_rate * step_rate, state["weight_sq"]
        )
        gathered = weight.clamp_min(1e-300)
        m = mean / gathered
        variance = torch.addcmul(square / gathered, m, m, value=-1.0).clamp_min_(0.0)
        effective = (weight * weight).div_(weight_sq.clamp_min(1e-300)).clamp_min_(1.0)
        se = variance.div_(effective).sqrt_()
        # m / se clipped to [0, 1]; where se is 0 that is the sign of m (±inf), and 0 where m is
        # 0 too (NaN), which also covers a source with no weighted evidence (m = 0).
        alpha = (m / se).clamp_(0.0, 1.0).nan_to_num_(0.0).mul_(drawn)
        alpha[0] = 1.0
        new_state = {
            "mean": mean,
            "square": square,
            "weight": weight,
            "weight_sq": weight_sq,
            "target_norm": torch.tensor([level, seen], dtype=F64),
        }
        return alpha, new_state

    needs = {Need.TARGET_ROW, Need.TARGET_EMA_NORM} | (
        {Need.NORMS} if variant == "cosine" else set()
    )
    params = {"rate": rate, "variant": variant}
    return Strategy("auto", frozenset(needs), init, update, params, target_ema=rate)
