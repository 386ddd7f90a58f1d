"""``gradnorm``: GradNorm of Chen, Badrinarayanan, Lee & Rabinovich (ICML 2018).

"GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks".
Task weights are learned so that the weighted gradient norms w_k ‖g_k‖ approach a common value,
raised for tasks that trained less (relative inverse training rate). A symmetric multi-task
baseline: the target is one more task, with no say over the auxiliaries.
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy, check_rate
from auxilia.strategies.inner_adam import adam_step

F64 = torch.float64
FLOAT_MAX = torch.finfo(F64).max


def gradnorm(alpha: float = 1.5, lr: float = 0.01) -> Strategy:
    """Coefficients w; then w ← Adam(w, ∂L_grad/∂w), w ← max(w, 0), rescaled to Σw = n.

    L_grad = Σ_k |w_k ‖g_k‖ − Ḡ · r_k^a| with Ḡ = mean_k w_k ‖g_k‖ and the target Ḡ · r_k^a
    held constant (as in the paper), so ∂L_grad/∂w_k = sign(w_k ‖g_k‖ − Ḡ r_k^a) · ‖g_k‖.
    r_k = L̃_k / mean_j L̃_j is the relative inverse training rate, L̃_k = L_k / L_k(0), and
    a = ``alpha`` (default 1.5, a common choice in reimplementations; the paper tunes it per
    problem, a larger a pulling harder towards equal training rates, and 0 balances the norms
    alone). Means and sums run over the n sources present in the step; w starts at 1, and α
    at a step is w before that step's update (the paper's w(t) weights the loss of step t).

    Choices against the paper and code: the norms are over all shared parameters (the
    engine's ‖g_k‖), not the last shared layer's weights (which the paper picks to save
    compute; the rule is the same). L_k(0) is source k's loss at the first step it is present
    (LibMTL uses the first epoch's mean). w is learned by its own Adam (β = 0.9, 0.999,
    ε = 1e-8) with learning rate ``lr`` (default 0.01, so w moves about 0.01 per step whatever
    the gradient scale; implementations put w in the model's optimiser, usually Adam too),
    and is clipped at 0 before the rescaling (the paper does not say how negative weights
    are avoided; LibMTL uses a softmax). A non-positive L_k(0) gives L̃_k = 1 and a negative
    L̃_k counts as 0.

    Absent sources get α_k = 0 and keep w_k and their Adam moments; with fewer than two
    present sources nothing is balanced and w is left as it is. Needs norms and losses.
    """
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise StrategyError(f"gradnorm: alpha must be a finite number >= 0, got {alpha!r}")
    check_rate("gradnorm", "lr", lr)

    def init(num_sources: int) -> State:
        zeros = torch.zeros(num_sources, dtype=F64)
        return {
            "weights": torch.ones(num_sources, dtype=F64),
            "initial_loss": zeros.clone(),
            "has_initial": torch.zeros(num_sources, dtype=torch.bool),
            "adam_m": zeros.clone(),
            "adam_v": zeros.clone(),
            "adam_t": torch.zeros(num_sources, dtype=torch.int64),
        }

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        present = stats.present
        norms = stats.require(Need.NORMS).to(F64)
        losses = stats.require(Need.LOSSES).to(F64)
        w = state["weights"]
        coefficients = torch.where(present, w, torch.zeros_like(w))

        first = present & ~state["has_initial"]
        initial = torch.where(first, losses, state["initial_loss"])
        has_initial = state["has_initial"] | first
        new_state = {**state, "initial_loss": initial, "has_initial": has_initial}
        n = int(present.sum())
        if n < 2:
            return coefficients, new_state

        safe_initial = torch.where(initial > 0, initial, torch.ones_like(initial))
        relative = torch.where(initial > 0, losses / safe_initial, torch.ones_like(losses))
        relative = torch.nan_to_num(relative, posinf=FLOAT_MAX).clamp_min(0.0)
        mean_relative = float(relative[present].mean())
        if mean_relative > 0 and math.isfinite(mean_relative):
            rate = relative / mean_relative
        else:
            rate = torch.ones_like(relative)
        weighted = w * norms
        goal = float(weighted[present].mean()) * rate**alpha
        goal = torch.nan_to_num(goal, nan=0.0, posinf=FLOAT_MAX)
        grad = torch.nan_to_num(torch.sign(weighted - goal)) * norms

        w, moments = adam_step(w, grad, state, "adam_", present, lr)
        w = torch.where(present, w.clamp_min(0.0), w)
        total = float(w[present].sum())
        if total > 0 and math.isfinite(total):
            w = torch.where(present, w * (n / total), w)
        else:
            w = torch.where(present, torch.ones_like(w), w)
        new_state.update({"weights": w, **moments})
        return coefficients, new_state

    params = {"alpha": alpha, "lr": lr}
    return Strategy("gradnorm", frozenset({Need.NORMS, Need.LOSSES}), init, update, params)
