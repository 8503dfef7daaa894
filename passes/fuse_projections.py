"""fuse_projections — one GEMM for the dense projections that read the same input.

Matches: every node ``x`` read by two or more *projections*, i.e. calls that
multiply ``x`` by a constant 2-D weight held by the module:

    aten.linear(x, W[, b])   W a get_attr of shape [out, in]   (base linears)
    aten.matmul(x, Wᵀ)       Wᵀ a get_attr of shape [in, out]  (lowered adapters)

with the same dtype and input width. In a lowered decoder layer these are
the routers and shared down-projections ``S_A`` of q/k/v, of gate/up and of
down (after ``join_up_projections`` has moved each adapted site's base ``W``
into one GEMM with its up-projection); without that join (``lower(...,
join_up=False)``) the base ``W`` of each adapted site is in the group too
(see docs/method.md, 'Fusion').

Produces, per group, with the concatenated weight stored as one buffer
``gm.malora_fused.<name>`` ([in, Σ out])::

    y      = x @ [W₁ᵀ | W₂ᵀ | …]  (+ [b₁ | 0 | …] when any member has a bias)
    y₁, y₂ = split(y, [out₁, out₂, …], -1)

and every member's uses read its slice instead. Source weights no longer
referenced by the graph are deleted from the module, so an export does not
carry them twice.

Why exact: column j of ``x @ [W₁ᵀ | W₂ᵀ]`` is the same dot product as in the
member's own GEMM; outputs agree up to float rounding of the GEMM blocking.

Keeps apart: weights whose target starts with one of ``keep_separate`` (a
switchable export's adapter tensors must stay their own named initializers).
With ``only_groups_reading`` set, a group is fused only when one of its
weights starts with one of those prefixes: ``lower(fuse=True)`` fuses the
groups that carry lowered adapter projections and leaves base-only groups
(q/k/v, gate/up of an unadapted layer) alone, because on onnxruntime's CPU
provider fusing those measured slower (tools/bench_fusion.py) while fusing a
site's router and shared down-projection into its base GEMM measured faster.

Requires: a lowered graph (run lower first) or a captured one without
adapters (tools/bench_fusion.py fuses base graphs); not an annotated, adapted
or merged-but-not-lowered one, whose adapter calls the fused nodes would hide
from fold_adapters / lower_routing. Graphs without projections are left
unchanged. Ensures: the graph stays lowered (or captured), fused when a group
matched; no two fusable projections share an input; running again matches
nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import cast

import torch
from torch import fx

from . import (
    ANNOTATED,
    CAPTURED,
    FUSED_ATTR,
    LOWERED,
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
FUSED_OPS = frozenset({aten.matmul.default, aten.add.Tensor, aten.split_with_sizes.default, operator.getitem})


@dataclass(frozen=True)
class Projection:
    """One ``x @ Wᵀ (+ b)`` call: its node, the weight as [in, out], and the bias (or None)."""

    node: fx.Node
    weight_t: torch.Tensor
    bias: torch.Tensor | None

    @property
    def targets(self) -> set[str]:
        """The get_attr targets this projection reads (weight, and bias when present)."""
        return {str(a.target) for a in self.node.args[1:] if isinstance(a, fx.Node)}

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]


class FuseProjections(BasePass):
    name = "fuse_projections"
    requires_states = (LOWERED, CAPTURED)
    refuses_states = (ANNOTATED,)
    ensures_states = (LOWERED, CAPTURED)
    run_first = "run lower first"

    def __init__(self, keep_separate: tuple[str, ...] = (), only_groups_reading: tuple[str, ...] = ()) -> None:
        self.keep_separate = tuple(keep_separate)
        self.only_groups_reading = tuple(only_groups_reading)

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups = self.fusable_groups(gm)
        sources = set().union(*(p.targets for g in groups for p in g)) if groups else set()
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # members are original nodes: computed once
        for group in groups:
            _fuse(gm, group, min((p.node for p in group), key=order.__getitem__))
        if groups:
            delete_unreferenced(gm, sources)
        return PassResult(gm, modified=bool(groups), matches=len(groups))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = self.fusable_groups(gm)
        if left:
            raise AssertionError(
                f"fuse_projections left {len(left)} fusable group(s), e.g. reading {left[0][0].node.args[0]}"
            )

    def fusable_groups(self, gm: fx.GraphModule) -> list[list[Projection]]:
        """Groups (≥ 2) of projections reading the same node with the same dtype and width."""
        groups = []
        for node in gm.graph.nodes:
            by_kind: dict[tuple, list[Projection]] = {}
            for user in node.users:
                proj = self.projection(gm, user, node)
                if proj is not None:
                    key = (proj.weight_t.dtype, proj.weight_t.device, proj.weight_t.shape[0])
                    by_kind.setdefault(key, []).append(proj)
            groups += [g for g in by_kind.values() if len(g) >= 2 and self.wanted(g)]
        return groups

    def wanted(self, group: list[Projection]) -> bool:
        return not self.only_groups_reading or any(
            t.startswith(self.only_groups_reading) for p in group for t in p.targets
        )

    def projection(self, gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> Projection | None:
        """``node`` as a projection of ``x``, or None when it is not one (or must stay apart)."""
        if node.op != "call_function" or not node.args or node.args[0] is not x or node.kwargs:
            return None
        if node.target is aten.linear.default and len(node.args) in (2, 3):
            weight, bias = constant_of(gm, node.args[1]), constant_of(gm, node.args[2]) if len(node.args) == 3 else None
            if weight is None or (len(node.args) == 3 and node.args[2] is not None and bias is None):
                return None
            weight_t: torch.Tensor | None = weight.T
        elif node.target is aten.matmul.default and len(node.args) == 2:
            weight_t, bias = constant_of(gm, node.args[1]), None
        else:
            return None
        if weight_t is None or weight_t.dim() != 2 or get_attr_target(node.args[1]).startswith(self.keep_separate):
            return None
        return Projection(node, weight_t, bias)


@torch.no_grad()
def _fuse(gm: fx.GraphModule, group: list[Projection], earliest: fx.Node) -> None:
    """Replace ``group`` by one GEMM + split, inserted before ``earliest``, its first member in graph order."""
    first = group[0].node
    x = cast(fx.Node, first.args[0])
    fake_mode = fake_mode_of(x)
    weight = torch.cat([p.weight_t for p in group], dim=1)
    bias = None
    if any(p.bias is not None for p in group):
        bias = torch.cat([p.bias if p.bias is not None else weight.new_zeros(p.out_features) for p in group])
    name = f"{get_attr_target(first.args[1]).replace('.', '_')}__x{len(group)}"
    graph = gm.graph
    with graph.inserting_before(earliest):
        out = emit(
            graph,
            aten.matmul.default,
            (x, attach_buffer(gm, FUSED_ATTR, name, weight, fake_mode)),
            first,
            FuseProjections.name,
            fake_mode,
        )
        if bias is not None:
            out = emit(
                graph,
                aten.add.Tensor,
                (out, attach_buffer(gm, FUSED_ATTR, f"{name}_bias", bias, fake_mode)),
                first,
                FuseProjections.name,
                fake_mode,
            )
        parts = emit(
            graph,
            aten.split_with_sizes.default,
            (out, [p.out_features for p in group], -1),
            first,
            FuseProjections.name,
            fake_mode,
        )
        slices = [
            emit(graph, operator.getitem, (parts, i), p.node, FuseProjections.name, fake_mode)
            for i, p in enumerate(group)
        ]
    for proj, part in zip(group, slices, strict=True):  # outside the block: the insertion point is one of these nodes
        proj.node.replace_all_uses_with(part)
        graph.erase_node(proj.node)
