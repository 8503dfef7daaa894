"""Trainable-parameter accounting per site and method (see docs/method.md, 'Trainable parameters')."""

from __future__ import annotations

from dataclasses import dataclass

from .config import DEFAULT_RANK, DEFAULT_SHARED_RANK, METHODS, MALoRAConfig


def site_parameters(method: str, n: int, m: int, *, num_experts: int, rank: int, shared_rank: int | None = None) -> int:
    """Trainable parameters of one site (router included for routed methods).

    MALoRA ``d·n + N·r̄·d + N·r̄·m + N·n``; MoLoRA ``N·r·(n+m) + N·n``;
    HydraLoRA ``r·n + N·r·m + N·n``; LoRA ``r·(n+m)``.
    """
    big_n, r = num_experts, rank
    if method == "malora":
        if shared_rank is None:
            raise ValueError("shared_rank: required for method 'malora'")
        d = shared_rank
        return d * n + big_n * r * d + big_n * r * m + big_n * n
    if method == "molora":
        return big_n * r * (n + m) + big_n * n
    if method == "hydralora":
        return r * n + big_n * r * m + big_n * n
    if method == "lora":
        return r * (n + m)
    raise ValueError(f"unknown method {method!r}")


@dataclass(frozen=True)
class SiteCount:
    fqn: str
    in_features: int
    out_features: int
    parameters: int


def count_sites(config: MALoRAConfig, sites: dict[str, dict[str, int]]) -> list[SiteCount]:
    """Per-site trainable parameter counts of ``config`` for ``{fqn: {in_features, out_features}}``."""
    return [
        SiteCount(
            fqn,
            s["in_features"],
            s["out_features"],
            site_parameters(
                config.method,
                s["in_features"],
                s["out_features"],
                num_experts=config.num_experts,
                rank=config.rank,
                shared_rank=config.shared_rank,
            ),
        )
        for fqn, s in sites.items()
    ]


def method_ranks(config: MALoRAConfig) -> dict[str, int]:
    """The rank each method is compared at: ``config``'s rank for its own method, every other
    method at its own default (MALoRA r̄=12, MoLoRA / HydraLoRA r=8, LoRA r=64), so that no
    method is shown at a rank nobody would pick for it (LoRA at MALoRA's 12, say)."""
    return {method: config.rank if method == config.method else DEFAULT_RANK[method] for method in METHODS}


def method_totals(config: MALoRAConfig, sites: dict[str, dict[str, int]]) -> dict[str, int]:
    """Total trainable parameters of every method on these sites, at this config's N and at
    :func:`method_ranks` (MALoRA with this config's d, or 32, capped at each site's in_features)."""
    ranks = method_ranks(config)
    totals = {}
    for method in METHODS:
        totals[method] = sum(
            site_parameters(
                method,
                s["in_features"],
                s["out_features"],
                num_experts=config.num_experts,
                rank=ranks[method],
                shared_rank=min(config.shared_rank or DEFAULT_SHARED_RANK, s["in_features"]),
            )
            for s in sites.values()
        )
    return totals


def percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0
