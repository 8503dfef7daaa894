"""Folded routed adapters: what the merge pass turns a trained mixture into.

A folded mixture computes, for input ``x`` ([..., n]),

    z = D x                      (shared down-projection D ∈ [k, n], or z = x)
    h_t = E_t z                  (per-expert down-projection E ∈ [N, r, k], or h_t = z)
    Δy = Σ_t G_t(x) U_t h_t      (U ∈ [N, m, r], the scale already folded in)

with the router ``G`` of :func:`malora_fx.adapters.layers.route`. Every method maps onto
it exactly:

    molora     D = none,  E = A,    U = s·B
    hydralora  D = A,     E = none, U = s·B
    malora     D = S_A,   E = P,    U = s·B                  (P kept)
    malora     D = S_A,   E = none, U = s·B_t P_t ∈ [N,m,d]  (P folded)

MALoRA folds ``P`` into ``B`` when that costs fewer multiply-adds per token:
``N·d·m`` (folded) against ``N·r̄·d + N·r̄·m`` (kept) — always when d ≤ r̄
(see docs/method.md, 'Merge'), and never at the paper's r̄=12, d=32 once m ≥ 20.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import HydraLoRALayer, MALoRALayer, MixtureLayer, MoLoRALayer
from .routing import route


def fold_malora_coefficients(num_experts: int, rank: int, shared_rank: int, out_features: int) -> bool:
    """Whether folding ``P`` into ``B`` is cheaper per token than keeping it."""
    return num_experts * shared_rank * out_features <= num_experts * rank * (shared_rank + out_features)


class FoldedMixture(nn.Module):
    """A routed adapter with its scale (and possibly MALoRA's P) folded in; no trainable parameters."""

    router: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor | None
    expert_down: torch.Tensor | None

    def __init__(
        self,
        fqn: str,
        router: torch.Tensor,
        up: torch.Tensor,
        *,
        top_k: int,
        normalize_top_k: bool,
        down: torch.Tensor | None = None,
        expert_down: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.fqn = fqn
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.register_buffer("router", router.detach().clone())
        self.register_buffer("up", up.detach().clone())
        self.register_buffer("down", None if down is None else down.detach().clone())
        self.register_buffer("expert_down", None if expert_down is None else expert_down.detach().clone())

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    @property
    def expert_rank(self) -> int:
        return self.up.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.to(self.up.dtype)
        gates, _, _ = route(xs, self.router, self.top_k, self.normalize_top_k)
        z = xs if self.down is None else torch.nn.functional.linear(xs, self.down)
        if self.expert_down is None:
            h = z.unsqueeze(-2).expand(*z.shape[:-1], self.num_experts, z.shape[-1])
        else:
            h = torch.nn.functional.linear(z, self.expert_down.flatten(0, 1)).unflatten(
                -1, (self.num_experts, self.expert_rank)
            )
        return torch.einsum("...tr,tmr->...m", h * gates.unsqueeze(-1), self.up).to(x.dtype)

    def extra_repr(self) -> str:
        parts = [f"{self.fqn}: N={self.num_experts}, r={self.expert_rank}, top_k={self.top_k}"]
        parts.append("down" if self.down is not None else "no down")
        parts.append("expert_down" if self.expert_down is not None else "no expert_down")
        return ", ".join(parts)


@torch.no_grad()
def fold_mixture(layer: MixtureLayer) -> FoldedMixture:
    """The folded equivalent of a trained routed layer (exact up to rounding)."""
    common: dict[str, Any] = dict(top_k=layer.top_k, normalize_top_k=layer.normalize_top_k)
    scaled_b = layer.B * layer.scale
    if isinstance(layer, MoLoRALayer):
        return FoldedMixture(layer.fqn, layer.router, scaled_b, expert_down=layer.A, **common)
    if isinstance(layer, HydraLoRALayer):
        return FoldedMixture(layer.fqn, layer.router, scaled_b, down=layer.A, **common)
    if isinstance(layer, MALoRALayer):
        if fold_malora_coefficients(layer.num_experts, layer.rank, layer.shared_rank, layer.out_features):
            return FoldedMixture(layer.fqn, layer.router, torch.bmm(scaled_b, layer.P), down=layer.S, **common)
        return FoldedMixture(layer.fqn, layer.router, scaled_b, down=layer.S, expert_down=layer.P, **common)
    raise TypeError(f"cannot fold {type(layer).__name__}")
