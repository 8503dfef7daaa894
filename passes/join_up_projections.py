"""join_up_projections — one GEMM for a site's base projection and its adapter's up-projection.

Matches: the add that ``insert_adapters`` left at every adapted site, once
``lower_routing`` has written the adapter as plain ops ending in its
up-projection::

    y = aten.add(aten.linear(x, W[, b]), aten.matmul(a, U))

``W`` (and ``b``) a ``get_attr`` of the base, ``U`` a lowered adapter buffer
(``malora_lowered.<site>__up``: ``[N·r, out]`` for a routed site, ``[r, out]`` for
a LoRA site kept out of ``W``), and the linear and the matmul read by the add
alone. ``a`` is what the adapter feeds its up-projection: the gated expert
activations ``h ⊙ (g @ spread)``, or ``x @ Aᵀ`` for LoRA.

Produces, with the stacked weight stored as ``gm.malora_fused.<W's name>__up``
(``[in + N·r, out]``)::

    y = cat([x, a], -1) @ [Wᵀ ; U]   (+ b)

Why: at a decode step every GEMM reads its whole weight for one token, and
onnxruntime's CPU GEMM reads a short ``[N·r, out]`` weight (inner dimension
96 on SmolLM2's MALoRA) at a fraction of the bandwidth it reaches on
``[in + N·r, out]``; the add goes too. On SmolLM2 (2 cores, onnxruntime 1.32)
decode measured 0.95-0.99x and prefill 0.96-1.01x of the separate form
(docs/method.md, 'Fusion').

Why exact: ``[x, a] @ [Wᵀ ; U] = x Wᵀ + a U`` column by column; outputs agree up
to float rounding of the longer dot products.

Run it after ``lower_routing`` and before ``fuse_projections``: it takes the
base linear out of the projections that read ``x``, so ``fuse_projections`` then
concatenates only the routers and shared down-projections of the sites that
read ``x``. Keeps apart: adapter buffers whose name starts with one of
``keep_separate`` (a switchable export's tensors must stay their own named
initializers). Requires: a lowered graph, not yet fused (a fused base GEMM no
longer matches). Ensures: the graph stays lowered; no matched add is left;
running again matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import fx

from . import (
    ANNOTATED,
    CAPTURED,
    FUSED_ATTR,
    LOWERED,
    LOWERED_ATTR,
    BasePass,
    PassResult,
    attach_buffer,
    constant_of,
    delete_unreferenced,
    emit,
    fake_mode_of,
    get_attr_target,
)

aten = torch.ops.aten

# Every call_function target the pass adds.
JOINED_OPS = frozenset({aten.cat.default, aten.matmul.default, aten.add.Tensor})


@dataclass(frozen=True)
class Site:
    """One matched ``linear(x, W[, b]) + a @ U``: the add, its two inputs and their weights."""

    add: fx.Node
    linear: fx.Node
    up: fx.Node
    weight: torch.Tensor  # W, [out, in]
    up_weight: torch.Tensor  # U, [N·r, out]

    @property
    def sources(self) -> set[str]:
        """The ``get_attr`` targets of W and U (read before the site's nodes are erased)."""
        return {get_attr_target(self.linear.args[1]), get_attr_target(self.up.args[1])}


class JoinUpProjections(BasePass):
    name = "join_up_projections"
    requires_states = (LOWERED, CAPTURED)
    refuses_states = (ANNOTATED,)
    ensures_states = (LOWERED, CAPTURED)
    run_first = "run lower first"

    def __init__(self, keep_separate: tuple[str, ...] = ()) -> None:
        self.keep_separate = tuple(keep_separate)

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = self.sites(gm)
        sources = set().union(*(s.sources for s in sites))
        for site in sites:
            _join(gm, site)
        if sites:
            delete_unreferenced(gm, sources)
        return PassResult(gm, modified=bool(sites), matches=len(sites))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = self.sites(gm)
        if left:
            raise AssertionError(f"join_up_projections left {len(left)} site(s), e.g. {left[0].add}")

    def sites(self, gm: fx.GraphModule) -> list[Site]:
        adds = (n for n in gm.graph.nodes if _is_call(n, aten.add.Tensor) and len(n.args) == 2 and not n.kwargs)
        return [site for site in (self.match(gm, add) for add in adds) if site is not None]

    def match(self, gm: fx.GraphModule, add: fx.Node) -> Site | None:
        """``add`` as a base linear plus a lowered up-projection (either order), else None."""
        first, second = add.args
        for linear, up in ((first, second), (second, first)):
            if _is_call(linear, aten.linear.default) and _is_call(up, aten.matmul.default):
                site = self.match_pair(gm, add, cast(fx.Node, linear), cast(fx.Node, up))
                if site is not None:
                    return site
        return None

    def match_pair(self, gm: fx.GraphModule, add: fx.Node, linear: fx.Node, up: fx.Node) -> Site | None:
        """The site of ``add = linear + up`` when both read constants of matching shapes and only ``add`` reads them."""
        if len(linear.users) != 1 or len(up.users) != 1 or linear.kwargs or up.kwargs:
            return None
        up_target = get_attr_target(up.args[1])
        is_up = up_target.startswith(f"{LOWERED_ATTR}.") and up_target.endswith("__up")
        if not is_up or up_target.startswith(self.keep_separate):
            return None
        weight, up_weight = constant_of(gm, linear.args[1]), constant_of(gm, up.args[1])
        bias = linear.args[2] if len(linear.args) == 3 else None
        if weight is None or up_weight is None or (bias is not None and constant_of(gm, bias) is None):
            return None
        if weight.dim() != 2 or up_weight.dim() != 2 or up_weight.shape[1] != weight.shape[0]:
            return None
        return Site(add, linear, up, weight, up_weight) if up_weight.dtype == weight.dtype else None


def _is_call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


@torch.no_grad()
def _join(gm: fx.GraphModule, site: Site) -> None:
    """Replace ``site.add`` by ``cat([x, a]) @ [Wᵀ ; U] (+ b)``, inserted right before it."""
    x, a = cast(fx.Node, site.linear.args[0]), cast(fx.Node, site.up.args[0])
    bias = site.linear.args[2] if len(site.linear.args) == 3 else None
    fake_mode = fake_mode_of(x)
    stacked = torch.cat([site.weight.T, site.up_weight], dim=0)
    name = f"{get_attr_target(site.linear.args[1]).replace('.', '_')}__up"
    graph = gm.graph
    with graph.inserting_before(site.add):
        joined = emit(graph, aten.cat.default, ([x, a], -1), site.add, JoinUpProjections.name, fake_mode)
        weight = attach_buffer(gm, FUSED_ATTR, name, stacked, fake_mode)
        out = emit(graph, aten.matmul.default, (joined, weight), site.add, JoinUpProjections.name, fake_mode)
        if bias is not None:
            out = emit(graph, aten.add.Tensor, (out, bias), site.add, JoinUpProjections.name, fake_mode)
    site.add.replace_all_uses_with(out)
    for node in (site.add, site.linear, site.up):
        graph.erase_node(node)
