"""``auxilearn``: a learned combiner of the source losses (Navon et al., ICLR 2021).

"Auxiliary Learning by Implicit Differentiation". A small network g_φ combines the source
losses into the training loss; φ follows the hypergradient of the target loss on a held-out
slice of target data, so auxiliaries that do not help the held-out target lose weight.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy

Combiner = Literal["linear", "mlp"]


def _mlp_alpha(phi: dict[str, torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
    """∂NN_φ(ℓ)/∂ℓ_k for the monotone MLP (softplus, non-negative weights), differentiable in φ."""
    x = losses.detach().requires_grad_(True)
    h = x
    for i in range(len(phi) // 2):
        h = h @ phi[f"w{i}"].T + phi[f"b{i}"]
        if i < len(phi) // 2 - 1:
            h = torch.nn.functional.softplus(h)
    (alpha,) = torch.autograd.grad(h.sum(), x, create_graph=True)
    return alpha


def auxilearn(
    combiner: Combiner = "linear",
    hidden: int = 10,
    update_every: int = 30,
    meta_lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    clip: float = 10.0,
    seed: int = 0,
) -> Strategy:
    """α_0 = 1, α_k = ∂g_φ/∂ℓ_k; every N steps φ ← SGD(φ, clip(−Σ_k <g_val, g_k> ∂α_k/∂φ)).

    ``combiner="linear"``: g_φ = ℓ_0 + Σ_k φ_k ℓ_k with φ ≥ 0 starting at 1, so α_k = φ_k (the
    code's ``MonoLinearHyperNet``). ``"mlp"``: g_φ = ℓ_0 + NN_φ(ℓ_1..ℓ_K), a softplus MLP with
    one hidden layer of ``hidden`` units and weights kept ≥ 0 (``MonoNonlinearHyperNet``,
    initialised U(0, 1) as in the code), evaluated at the mean source losses, so that α_k > 0
    depends on where each loss stands. Every ``update_every`` steps (the Oxford-Pet setting,
    30) φ takes one SGD step (lr 1e-3, momentum 0.9, weight decay 1e-4, hypergradient norm
    clipped to 10: the library's defaults) and is clamped to ≥ 0.

    The hypergradient ∂L_val/∂φ = −(∂²L_T/∂φ∂W) H⁻¹ ∇_W L_val uses the held-out target
    gradient g_val (``Need.VALIDATION``; the Trainer holds out ``train.holdout`` of the target).
    Departures: H⁻¹ is the identity (a Neumann series with J = 0 terms; with the paper's
    γ = 1e-4 the J = 3 terms differ from a plain multiple of ∇_W L_val by O(γ‖H‖)), so the
    hypergradient needs only the row <g_val, g_k>, no Hessian-vector product; it is averaged
    over the steps since the last update instead of taken on one batch (same expectation,
    less noise); the per-sample and per-pixel combiners are not offered (the combiner sees one
    mean loss per source).
    """
    if combiner not in ("linear", "mlp"):
        raise StrategyError(f"auxilearn: combiner must be 'linear' or 'mlp', got {combiner!r}")
    for key, value in (("hidden", hidden), ("update_every", update_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StrategyError(f"auxilearn: {key} must be an integer >= 1, got {value!r}")
    for key, number in (
        ("meta_lr", meta_lr),
        ("momentum", momentum),
        ("weight_decay", weight_decay),
        ("clip", clip),
    ):
        if not math.isfinite(number) or number < 0:
            raise StrategyError(f"auxilearn: {key} must be a finite number >= 0, got {number!r}")
    if momentum >= 1:
        raise StrategyError(f"auxilearn: momentum must be < 1, got {momentum!r}")

    def init(num_sources: int) -> State:
        k = num_sources - 1
        phi: dict[str, torch.Tensor]
        if combiner == "linear":
            phi = {"w0": torch.ones(1, k, dtype=torch.float64)}
        else:
            gen = torch.Generator().manual_seed(seed)
            phi = {
                "w0": torch.rand(hidden, k, generator=gen, dtype=torch.float64),
                "b0": torch.zeros(hidden, dtype=torch.float64),
                "w1": torch.rand(1, hidden, generator=gen, dtype=torch.float64),
                "b1": torch.zeros(1, dtype=torch.float64),
            }
        state = {f"phi.{name}": value for name, value in phi.items()}
        state |= {f"velocity.{name}": torch.zeros_like(value) for name, value in phi.items()}
        state |= {f"hypergrad.{name}": torch.zeros_like(value) for name, value in phi.items()}
        state["count"] = torch.zeros((), dtype=torch.int64)
        state["accumulated"] = torch.zeros((), dtype=torch.int64)
        return state

    def alphas(phi: dict[str, torch.Tensor], losses: torch.Tensor | None) -> torch.Tensor:
        if combiner == "linear":
            return phi["w0"][0]
        assert losses is not None
        return _mlp_alpha(phi, losses)

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        names = [key[4:] for key in state if key.startswith("phi.")]
        phi = {n: state[f"phi.{n}"].clone().requires_grad_(True) for n in names}
        losses = stats.require(Need.LOSSES).to(torch.float64)[1:] if combiner == "mlp" else None
        row = stats.require(Need.VALIDATION).to(torch.float64)[1:]
        present = stats.present[1:]
        alpha_aux = alphas(phi, losses)
        # ∂L_val/∂φ ≈ −Σ_k <g_val, g_k> ∂α_k/∂φ (absent sources contribute nothing).
        objective = -(torch.where(present, row, torch.zeros_like(row)) * alpha_aux).sum()
        grads = torch.autograd.grad(objective, [phi[n] for n in names], allow_unused=True)
        new_state = dict(state)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                new_state[f"hypergrad.{n}"] = state[f"hypergrad.{n}"] + g.detach()
        count = state["count"] + 1
        new_state["count"] = count
        new_state["accumulated"] = state["accumulated"] + 1
        if int(count) % update_every == 0:
            new_state = _meta_step(new_state, names)
            phi = {n: new_state[f"phi.{n}"].clone().requires_grad_(True) for n in names}
            alpha_aux = alphas(phi, losses)
        alpha = torch.zeros(stats.num_sources, dtype=torch.float64)
        alpha[0] = 1.0
        alpha[1:] = torch.where(present, alpha_aux.detach(), torch.zeros_like(alpha_aux.detach()))
        return alpha, new_state

    def _meta_step(state: State, names: list[str]) -> State:
        steps = max(int(state["accumulated"]), 1)
        grads = {n: state[f"hypergrad.{n}"] / steps for n in names}
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        scale = clip / norm if clip > 0 and norm > clip else 1.0
        out = dict(state)
        for n in names:
            g = grads[n] * scale + weight_decay * state[f"phi.{n}"]
            velocity = momentum * state[f"velocity.{n}"] + g
            value = state[f"phi.{n}"] - meta_lr * velocity
            if n.startswith("w"):
                value = value.clamp_min(0.0)  # monotone: g_φ non-decreasing in every loss
            out[f"phi.{n}"] = value
            out[f"velocity.{n}"] = velocity
            out[f"hypergrad.{n}"] = torch.zeros_like(grads[n])
        out["accumulated"] = torch.zeros((), dtype=torch.int64)
        return out

    needs = {Need.VALIDATION} | ({Need.LOSSES} if combiner == "mlp" else set())
    params = {
        "combiner": combiner,
        "hidden": hidden,
        "update_every": update_every,
        "meta_lr": meta_lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "clip": clip,
        "seed": seed,
    }
    return Strategy("auxilearn", frozenset(needs), init, update, params)
