"""``uncertainty``: homoscedastic-uncertainty weighting of Kendall, Gal & Cipolla (CVPR 2018).

"Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics". Each
task k has a learnable log-variance s_k; the training loss Σ_k exp(−s_k) L_k + s_k lowers the
weight of tasks whose loss (noise) is large. A symmetric multi-task baseline: the target is
one more task, with no say over the auxiliaries.
"""

from __future__ import annotations

import torch

from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy, check_rate
from auxilia.strategies.inner_adam import adam_step

F64 = torch.float64
LOG_VARIANCE_BOUND = 20.0  # s_k is kept in [-20, 20]: α_k in [2e-9, 4.9e8], always finite
GRADIENT_BOUND = 1e100  # so that the squared gradient in Adam's second moment stays finite


def uncertainty(lr: float = 0.01) -> Strategy:
    """α_k = exp(−s_k); then s ← Adam(s, ∂/∂s [Σ_k exp(−s_k) L_k + s_k] = 1 − exp(−s_k) L_k).

    Convention: the loss is Σ_k exp(−s_k) L_k + s_k, without the 0.5 factors of the paper's
    Gaussian likelihood (LibMTL's L_k / (2 e^{s_k}) + s_k / 2). Both have the same equilibrium
    e^{s_k} = L_k; the 0.5 version only halves every α, which is a change of learning rate.
    So at equilibrium α_k = 1 / L_k: the noisier (larger-loss) task weighs less. s starts at 0,
    so the first steps weigh every source 1 as ``equal`` does (LibMTL and the MTAN code start
    at s = −0.5 under their 0.5 convention, i.e. α = e^0.5 / 2 ≈ 0.82).

    α at a step is exp(−s) before that step's update of s, as when s and the model take the
    same gradient step. The paper learns s with the network's optimiser; here s has its own
    Adam (β = 0.9, 0.999, ε = 1e-8) with learning rate ``lr`` (default 0.01: s moves about
    0.01 per step, so it reaches log L within a few hundred steps; the model's usual rates
    such as 1e-4 would leave s near 0 for a whole short run). s is clipped to [−20, 20] so
    that a zero or negative loss (whose optimum is s → −∞) still gives finite coefficients.

    Absent sources get α_k = 0 and keep s_k and their Adam moments. Needs only the losses.
    """
    check_rate("uncertainty", "lr", lr)

    def init(num_sources: int) -> State:
        zeros = torch.zeros(num_sources, dtype=F64)
        return {
            "log_variance": zeros.clone(),
            "adam_m": zeros.clone(),
            "adam_v": zeros.clone(),
            "adam_t": torch.zeros(num_sources, dtype=torch.int64),
        }

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        present = stats.present
        losses = stats.require(Need.LOSSES).to(F64)
        s = state["log_variance"]
        weight = torch.exp(-s)
        alpha = torch.where(present, weight, torch.zeros_like(weight))
        grad = torch.nan_to_num(1.0 - weight * losses).clamp(-GRADIENT_BOUND, GRADIENT_BOUND)
        s, moments = adam_step(s, grad, state, "adam_", present, lr)
        s = s.clamp(-LOG_VARIANCE_BOUND, LOG_VARIANCE_BOUND)
        return alpha, {"log_variance": s, **moments}

    return Strategy("uncertainty", frozenset({Need.LOSSES}), init, update, {"lr": lr})
