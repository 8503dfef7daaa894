"""Adapter layers: LoRA, MoLoRA, HydraLoRA and MALoRA as one family.

Each layer maps the input ``x`` of a linear site ``y = W x + b`` (shape
``[..., n]``) to the additive update ``Δy`` (shape ``[..., m]``); the insertion
pass wires ``y + Δy`` into the graph. The formulas (see docs/method.md, 'The four
methods'), with ``s = alpha/rank``:

    lora       Δy = s · B A x
    molora     Δy = s · Σ_t G_t(x) B_t A_t x
    hydralora  Δy = s · Σ_t G_t(x) B_t A x
    malora     Δy = s · Σ_t G_t(x) B_t P_t S_A x

Routed layers compute all experts at once: a per-expert input ``h ∈ [..., N, r]``
from one batched matmul, gated by ``G(x) = TopK(Softmax(W_g x))`` (masked
experts get gate 0), and one contraction with ``B ∈ [N, m, r]``. There is no
Python loop over experts or tokens, no ``.item()`` and no data-dependent shape,
so the layers trace under ``torch.export`` with dynamic batch and sequence.

Parameter names are the adapter-file keys (``S``, ``P``, ``A``, ``B``,
``router``) and their shapes are the file shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import MALoRAConfig
from .routing import balance_from_sums, route, router_sums


def site_generator(seed: int, fqn: str) -> torch.Generator:
    """A CPU generator seeded from the config seed and the site name, so a
    site's initialisation does not depend on which other sites are adapted."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """``nn.Linear``'s default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


class AdapterLayer(nn.Module):
    """Base of the adapter family: casting, dropout, scale, shapes, bookkeeping.

    Subclasses set ``method`` and implement :meth:`update` (the unscaled Δy of
    the dropped-out input) and :meth:`file_shapes`.
    """

    method: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, config: MALoRAConfig, fqn: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fqn = fqn
        self.rank = config.rank
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def file_shapes(cls, in_features: int, out_features: int, config: MALoRAConfig) -> dict[str, tuple[int, ...]]:
        """Adapter-file tensor names and shapes for a site of this method."""
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Δy for input ``x`` ([..., n]), in ``x``'s dtype."""
        param = next(iter(self.parameters()))
        delta = self.update(x.to(param.dtype)) * self.scale
        return delta.to(x.dtype)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter-file tensors of this site (the parameters themselves)."""
        return dict(self.named_parameters())

    def extra_repr(self) -> str:
        return f"{self.fqn}: in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


class LoRALayer(AdapterLayer):
    """Plain LoRA: ``Δy = s · B A x`` with ``A ∈ [r, n]`` (Kaiming) and ``B ∈ [m, r]`` (zero)."""

    A: nn.Parameter
    B: nn.Parameter
    method = "lora"

    def __init__(self, in_features: int, out_features: int, config: MALoRAConfig, fqn: str) -> None:
        super().__init__(in_features, out_features, config, fqn)
        gen = site_generator(config.seed, fqn)
        self.A = nn.Parameter(kaiming_uniform((config.rank, in_features), in_features, gen))
        self.B = nn.Parameter(torch.zeros(out_features, config.rank))

    @classmethod
    def file_shapes(cls, in_features, out_features, config):
        return {"A": (config.rank, in_features), "B": (out_features, config.rank)}

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B)


class MixtureLayer(AdapterLayer):
    """A routed mixture of low-rank experts sharing one gated up-projection.

    ``Δy = s · Σ_t G_t(x) B_t h_t`` where ``h = expert_inputs(dropout(x))`` is
    ``[..., N, r]`` and ``B ∈ [N, m, r]`` starts at zero. The router reads the
    un-dropped input. The last forward's router statistics are kept for
    :meth:`aux_loss`.
    """

    B: nn.Parameter
    router: nn.Parameter

    def __init__(self, in_features: int, out_features: int, config: MALoRAConfig, fqn: str) -> None:
        super().__init__(in_features, out_features, config, fqn)
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.normalize_top_k = config.normalize_top_k
        self._router_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _init_router_and_up(self, config: MALoRAConfig, gen: torch.Generator) -> None:
        n, m, big_n = self.in_features, self.out_features, config.num_experts
        self.B = nn.Parameter(torch.zeros(big_n, m, config.rank))
        self.router = nn.Parameter(kaiming_uniform((big_n, n), n, gen))

    def expert_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert low-rank inputs ``[..., N, r]``."""
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        gates, probs, chosen = route(x, self.router, self.top_k, self.normalize_top_k)
        self._router_stats = (probs, chosen)
        gated = self.expert_inputs(self.dropout(x)) * gates.unsqueeze(-1)
        return torch.einsum("...tr,tmr->...m", gated, self.B)

    def router_sums(self, token_mask: torch.Tensor | None = None):
        """Router sums of the last forward (see :func:`router_sums`)."""
        if self._router_stats is None:
            raise RuntimeError(f"{self.fqn}: no forward pass has run yet, so there is no router loss")
        probs, chosen = self._router_stats
        if token_mask is not None and tuple(token_mask.shape) != tuple(probs.shape[:-1]):
            raise ValueError(
                f"{self.fqn}: token mask shape {tuple(token_mask.shape)} does not match the "
                f"site's token shape {tuple(probs.shape[:-1])}"
            )
        return router_sums(probs, chosen, token_mask)

    def aux_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Load-balancing loss of the last forward (see :func:`load_balancing_loss`)."""
        return balance_from_sums(*self.router_sums(token_mask))


class MoLoRALayer(MixtureLayer):
    """MoLoRA: N independent LoRA experts, ``A ∈ [N, r, n]`` (Kaiming), ``B ∈ [N, m, r]``."""

    A: nn.Parameter
    method = "molora"

    def __init__(self, in_features, out_features, config, fqn):
        super().__init__(in_features, out_features, config, fqn)
        gen = site_generator(config.seed, fqn)
        self.A = nn.Parameter(kaiming_uniform((config.num_experts, config.rank, in_features), in_features, gen))
        self._init_router_and_up(config, gen)

    @classmethod
    def file_shapes(cls, in_features, out_features, config):
        big_n, r = config.num_experts, config.rank
        return {"A": (big_n, r, in_features), "B": (big_n, out_features, r), "router": (big_n, in_features)}

    def expert_inputs(self, x):
        return F.linear(x, self.A.flatten(0, 1)).unflatten(-1, (self.num_experts, self.rank))


class HydraLoRALayer(MixtureLayer):
    """HydraLoRA: one shared ``A ∈ [r, n]`` and per-expert ``B ∈ [N, m, r]``."""

    A: nn.Parameter
    method = "hydralora"

    def __init__(self, in_features, out_features, config, fqn):
        super().__init__(in_features, out_features, config, fqn)
        gen = site_generator(config.seed, fqn)
        self.A = nn.Parameter(kaiming_uniform((config.rank, in_features), in_features, gen))
        self._init_router_and_up(config, gen)

    @classmethod
    def file_shapes(cls, in_features, out_features, config):
        big_n, r = config.num_experts, config.rank
        return {"A": (r, in_features), "B": (big_n, out_features, r), "router": (big_n, in_features)}

    def expert_inputs(self, x):
        h = F.linear(x, self.A).unsqueeze(-2)
        return h.expand(*h.shape[:-2], self.num_experts, self.rank)


class MALoRALayer(MixtureLayer):
    """MALoRA: shared ``S_A ∈ [d, n]``, per-expert ``P ∈ [N, r̄, d]`` and ``B ∈ [N, m, r̄]``.

    ``S_A x`` is computed once for all experts. Initialisation (see docs/method.md,
    'Initialisation'): for
    each expert a Kaiming-uniform ``K_t ∈ [d, n]`` with SVD ``U_t Σ_t V_t``;
    ``P_t = (U_t Σ_t)[:r̄] / β`` (rows past d zero) and ``S_A = β V_0``.
    """

    S: nn.Parameter
    P: nn.Parameter
    method = "malora"

    def __init__(self, in_features, out_features, config, fqn):
        super().__init__(in_features, out_features, config, fqn)
        self.shared_rank = config.shared_rank
        gen = site_generator(config.seed, fqn)
        shared, coeffs = malora_init(in_features, config.num_experts, config.rank, config.shared_rank, config.beta, gen)
        self.S = nn.Parameter(shared)
        self.P = nn.Parameter(coeffs)
        self._init_router_and_up(config, gen)

    @classmethod
    def file_shapes(cls, in_features, out_features, config):
        big_n, r, d = config.num_experts, config.rank, config.shared_rank
        return {
            "S": (d, in_features),
            "P": (big_n, r, d),
            "B": (big_n, out_features, r),
            "router": (big_n, in_features),
        }

    def expert_inputs(self, x):
        z = F.linear(x, self.S)
        return F.linear(z, self.P.flatten(0, 1)).unflatten(-1, (self.num_experts, self.rank))


def random_expert_bases(
    in_features: int, num_experts: int, shared_rank: int, generator: torch.Generator
) -> torch.Tensor:
    """The Kaiming-uniform matrices ``K_t ∈ [d, n]`` MALoRA's init decomposes, ``[N, d, n]``."""
    return kaiming_uniform((num_experts, shared_rank, in_features), in_features, generator)


_LOADED_NEXT = contextvars.ContextVar("adapter weights loaded next", default=False)


@contextlib.contextmanager
def weights_loaded_next() -> Iterator[None]:
    """Within it, layers are built to be overwritten at once by a strict load (every tensor from a file,
    :func:`malora_fx.load_adapters`): MALoRA skips its SVD initialisation (~1.5 s for SmolLM2's 180 sites)
    and starts from zeros."""
    token = _LOADED_NEXT.set(True)
    try:
        yield
    finally:
        _LOADED_NEXT.reset(token)


def malora_init(
    in_features: int, num_experts: int, rank: int, shared_rank: int, beta: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MALoRA's SVD initialisation; returns ``(S_A [d, n], P [N, r̄, d])`` (zeros within :func:`weights_loaded_next`)."""
    if _LOADED_NEXT.get():
        return torch.zeros(shared_rank, in_features), torch.zeros(num_experts, rank, shared_rank)
    bases = random_expert_bases(in_features, num_experts, shared_rank, generator).double()
    u, sigma, v = torch.linalg.svd(bases, full_matrices=False)  # u [N,d,d], sigma [N,d], v [N,d,n]
    coeffs = torch.zeros(num_experts, rank, shared_rank, dtype=torch.float64)
    kept = min(rank, shared_rank)
    coeffs[:, :kept] = (u * sigma.unsqueeze(-2))[:, :kept] / beta
    shared = beta * v[0]
    return shared.float(), coeffs.float()


LAYER_CLASSES: dict[str, type[AdapterLayer]] = {
    cls.method: cls for cls in (MALoRALayer, MoLoRALayer, HydraLoRALayer, LoRALayer)
}


def make_layer(in_features: int, out_features: int, config: MALoRAConfig, fqn: str) -> AdapterLayer:
    """The adapter layer of ``config.method`` for one site."""
    return LAYER_CLASSES[config.method](in_features, out_features, config, fqn)
