"""The router and its load-balancing loss, shared by every routed layer and the folded form.

``G(x) = TopK(Softmax(W_g x))`` keeps the k largest probabilities (optionally
renormalised) and zeroes the rest; the Switch-Transformer loss
``N · Σ_t f_t · p̄_t`` pushes the routers towards balanced expert use
(docs/method.md, 'Routing' and 'Load-balancing loss'). The sums are kept apart
from the loss so data parallelism can add them over ranks first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int, normalize: bool):
    """Top-k softmax router.

    Returns ``(gates, probs, chosen)``, each ``[..., N]``: the gate values (the
    kept top-k probabilities, optionally renormalised to sum to 1, zeros
    elsewhere), the full softmax probabilities, and a 0/1 mask of the kept experts.
    """
    probs = torch.softmax(F.linear(x, weight), dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    if normalize:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
    chosen = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
    return gates, probs, chosen


def router_sums(probs: torch.Tensor, chosen: torch.Tensor, token_mask: torch.Tensor | None = None):
    """Per-expert sums over (real) tokens: ``(chosen_sum [N], prob_sum [N], count [])``.

    ``token_mask`` (``probs.shape[:-1]``, nonzero = real token) excludes padding.
    """
    num_experts = probs.shape[-1]
    probs = probs.reshape(-1, num_experts).float()
    chosen = chosen.reshape(-1, num_experts).float()
    if token_mask is None:
        weights = torch.ones(probs.shape[0], 1, device=probs.device)
    else:
        weights = token_mask.reshape(-1, 1).to(probs.device, torch.float32)
    return (chosen * weights).sum(0), (probs * weights).sum(0), weights.sum()


def balance_from_sums(chosen_sum: torch.Tensor, prob_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``N · Σ_t f_t · p̄_t`` with ``f = chosen_sum / count`` and ``p̄ = prob_sum / count``."""
    count = count.clamp_min(1.0)
    return chosen_sum.numel() * ((chosen_sum / count) * (prob_sum / count)).sum()


def load_balancing_loss(
    probs: torch.Tensor, chosen: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``N · Σ_t f_t · p̄_t``.

    ``f_t`` is the fraction of (real) tokens whose top-k includes expert t and
    ``p̄_t`` the mean router probability of t. Perfectly balanced routing gives
    ``top_k``; the loss is differentiable through ``probs`` only.
    """
    return balance_from_sums(*router_sums(probs, chosen, token_mask))
