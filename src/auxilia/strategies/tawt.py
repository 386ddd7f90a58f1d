"""``tawt``: target-aware weighted training (TAWT) of Chen, Crammer, He, Roth & Su (ICLR 2022).

"Weighted Training for Cross-Task Learning". Task (or dataset) weights ω on the simplex are
moved by mirror descent towards the sources whose gradients align with the target's, a cheap
stand-in for minimising the target loss of a representation trained on the ω-weighted sources.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy

F64 = torch.float64
Variant = Literal["joint", "pre-training"]


def tawt(variant: Variant = "joint", lr: float = 1.0, update_every: int = 100) -> Strategy:
    """ω_t ← ω_t · exp(η cos(g_0, g_t)) / Σ_s ω_s · exp(η cos(g_0, g_s)); α_t = n · ω_t.

    This is mirror descent with the code's gradient ĝ_t = −cos(∇L_target, ∇L_t) (the exact
    gradient, −<g_0, H⁻¹ g_t>, with the inverse Hessian replaced by the identity and the
    scale removed), η = ``lr`` (default 1.0, the code's ``weight_lr``). The weighted tasks and
    n, their number, depend on ``variant``:

    * ``"joint"`` (default): ω is over all K+1 sources, the target included with
      ĝ_0 = −cos(g_0, g_0) = −1, so n = K+1, ω starts at 1/(K+1) and α_0 = (K+1) ω_0. This
      is the default because the engine trains the target and the auxiliaries together,
      which is the paper's weighted *joint* training, and because the code's joint script
      (``run_weighted_joint_training_multi``) uses η = 1 on plain cosines, whereas its
      pre-training script sweeps a scale of the cosines (``inv_constant``).
    * ``"pre-training"``: ω is over the K auxiliaries only, n = K, ω starts at 1/K and the
      target keeps α_0 = 1 (the paper's weighted pre-training, run jointly here).

    α_t = n ω_t is the code's "loss × ω_task × #tasks": uniform ω gives α = 1 everywhere.

    Cadence: ω changes on steps with count % ``update_every`` == 0, the first step included,
    and is constant in between. The paper updates once per epoch (4 epochs in the code); the
    default of 100 steps gives 5 updates in a default 500-step run. On an update step the
    new ω also weights that step's gradient (as ``arml`` does); the code updates at the end
    of an epoch, from gradients of one fresh batch per task, for the next epoch. Here the
    cosines are those of the step's own batches, over all shared parameters (the code: the
    encoder only).

    Absent sources get α_t = 0; on an update step only the present weighted sources move, and
    their total mass is kept, so an absent source keeps its ω. With the target absent (or a
    zero target gradient, whose cosines are 0) ω does not change. The update is done in the
    log domain, so any η gives finite weights.
    """
    if variant not in ("joint", "pre-training"):
        raise StrategyError(f"tawt: variant must be 'joint' or 'pre-training', got {variant!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise StrategyError(f"tawt: lr must be a finite number > 0, got {lr!r}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise StrategyError(f"tawt: update_every must be an integer >= 1, got {update_every!r}")

    def weighted_mask(num_sources: int) -> torch.Tensor:
        mask = torch.ones(num_sources, dtype=torch.bool)
        if variant == "pre-training":
            mask[0] = False
        return mask

    def init(num_sources: int) -> State:
        mask = weighted_mask(num_sources)
        n = int(mask.sum())
        omega = torch.where(mask, torch.full((num_sources,), 1.0 / max(n, 1), dtype=F64), 0.0)
        return {"omega": omega, "count": torch.zeros((), dtype=torch.int64)}

    def mirror_step(stats: Statistics, omega: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        moving = mask & stats.present
        if not bool(stats.present[0]) or not bool(moving.any()):
            return omega
        mass = float(omega[moving].sum())
        if not mass > 0:
            return omega
        cosines = stats.cosines().to(F64)
        logits = torch.log(omega[moving]) + lr * cosines[moving]
        omega = omega.clone()
        omega[moving] = torch.softmax(logits, dim=0) * mass
        return omega

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        mask = weighted_mask(stats.num_sources)
        omega = state["omega"]
        if int(state["count"]) % update_every == 0:
            omega = mirror_step(stats, omega, mask)
        n = int(mask.sum())
        alpha = torch.where(mask & stats.present, n * omega, torch.zeros_like(omega))
        if variant == "pre-training":
            alpha[0] = 1.0 if bool(stats.present[0]) else 0.0
        return alpha, {"omega": omega.clone(), "count": state["count"] + 1}

    params = {"variant": variant, "lr": lr, "update_every": update_every}
    return Strategy("tawt", frozenset({Need.TARGET_ROW, Need.NORMS}), init, update, params)
