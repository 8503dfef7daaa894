"""group_routing — the routed sites that read one input are routed together, on ``[.., S, N]`` tensors.

The lowering writes each routed site's gating as its own chain (``lower_routing``)::

    probs = Softmax(logits);  v, i = TopK(probs, k)        # (v / ReduceSum(v) when normalised)
    g     = ScatterElements(probs * 0, i, v)
    a     = h * (g @ spread)                                # h = z @ C: the expert coefficients

and q/k/v (gate/up) take their logits and ``z`` from one fused GEMM's Split. This pass gives
such a group of S sites one chain on the concatenated logits, reshaped to ``[b, t, S, N]`` so
that Softmax and TopK still act per site::

    P  = Softmax(Reshape(Concat(logits_1..S), [0, 0, S, N]));  V, I = TopK(P, k)
    G  = Reshape(ScatterElements(P * 0, I, V), [0, 0, S·N])
    H  = Concat(z_1..S) @ blockdiag(C_1..S)        (or Concat(h_1..S) when that matrix would be large)
    a_1..S = Split(H * (G @ spread_{S·N, r}))

Exact: every op acts on the last axis (or is block-diagonal), so each site gets the numbers it
had (bit-identical logits on SmolLM2). On SmolLM2's MALoRA (150 of its 180 sites in 60 groups)
the graph loses 330 of 2,132 nodes, and decode measured 0.94-0.98x (prefill 0.99-1.02x) of the
ungrouped graph in four alternated A/B runs of 9 rounds (docs/method.md, 'Routing sites together').

Matched only in its exact lowered form (``_routing.top_k_gates``, shared with ``moe_routing``):
``spread`` the 0/1 block map, a zero-scalar Mul, TopK and Softmax on the last axis, rank-3 logits,
``C`` a constant; sites grouped when their logits
and ``z`` come from the same node and N, r, k, the normalisation, ``C``'s width and the dtype
agree. Sites turned into MoE nodes (``moe_routing``, which runs first) are not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ._attention import NodeBuilder
from ._routing import spread_shape, top_k_gates
from ._values import const_array, producer_of, replace_value

__all__ = ["RoutedGate", "group_routed_sites", "match_gate"]

# a group's block-diagonal C up to this many elements; beyond it the sites keep their own C
MAX_BLOCK_DIAGONAL = 1 << 16


@dataclass
class RoutedGate:
    """One site's gating chain, matched from its final ``a = h * (g @ spread)`` Mul."""

    gate: ir.Node
    logits: ir.Value
    h: ir.Value
    z: ir.Value | None  # h = z @ C, when h is that MatMul
    c: np.ndarray | None
    experts: int
    rank: int
    top_k: int
    normalize: bool

    def key(self) -> tuple:
        source = self.logits.producer()
        width = None if self.c is None else self.c.shape[0]
        return (id(source), self.experts, self.rank, self.top_k, self.normalize, width, self.h.dtype)


def match_gate(gate: ir.Node) -> RoutedGate | None:
    """``gate`` as a site's ``h * (g @ spread)``, with the chain that makes ``g``, else None."""
    if gate.op_type != "Mul" or gate.domain != "" or len(gate.inputs) != 2:
        return None
    for h, spread_out in (gate.inputs, gate.inputs[::-1]):
        spread = producer_of(spread_out, "MatMul")
        shape = spread_shape(const_array(spread.inputs[1])) if spread is not None else None
        gates = top_k_gates(spread.inputs[0]) if spread is not None else None
        if h is None or shape is None or gates is None:
            continue
        logits, top_k, normalize = gates
        if logits.shape is None or len(logits.shape) != 3:  # Reshape [0, 0, S, N] keeps batch and sequence
            continue
        down = producer_of(h, "MatMul")
        c = const_array(down.inputs[1]) if down is not None else None
        z = down.inputs[0] if down is not None and c is not None and c.ndim == 2 else None
        experts, rank = shape
        return RoutedGate(gate, logits, h, z, c if z is not None else None, experts, rank, top_k, normalize)
    return None


def _groups(graph: ir.Graph) -> list[list[RoutedGate]]:
    """Sites of two or more whose logits come from one node and whose gating agrees."""
    by_key: dict[tuple, list[RoutedGate]] = {}
    for node in graph:
        site = match_gate(node)
        if site is not None and site.logits.producer() is not None:
            by_key.setdefault(site.key(), []).append(site)
    return [sites for sites in by_key.values() if len(sites) >= 2]


def _coefficients(builder: NodeBuilder, sites: list[RoutedGate]) -> list[ir.Node]:
    """Nodes ending in the group's ``H``: one block-diagonal GEMM on the concatenated ``z`` when every
    ``z`` comes from the node that makes the logits and the matrix is small, else the sites' own ``h``
    concatenated."""
    anchor = sites[0].logits.producer()
    same_source = all(s.z is not None and s.z.producer() is anchor for s in sites)
    blocks = [s.c for s in sites if s.c is not None]
    if same_source and len(blocks) == len(sites) and _block_elements(blocks) <= MAX_BLOCK_DIAGONAL:
        concat = builder.node("Concat", [s.z for s in sites], {"axis": -1})
        matrix = builder.const(_block_diagonal(blocks), "block_c")
        return [concat, builder.node("MatMul", [concat.outputs[0], matrix])]
    return [builder.node("Concat", [s.h for s in sites], {"axis": -1})]


def _block_elements(blocks: list[np.ndarray]) -> int:
    return sum(b.shape[0] for b in blocks) * sum(b.shape[1] for b in blocks)


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    """The matrix with ``blocks`` on its diagonal and zeros elsewhere."""
    matrix = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)), blocks[0].dtype)
    row = col = 0
    for block in blocks:
        matrix[row : row + block.shape[0], col : col + block.shape[1]] = block
        row, col = row + block.shape[0], col + block.shape[1]
    return matrix


def _group(graph: ir.Graph, sites: list[RoutedGate], index: int) -> None:
    """Insert the group's chain after the node that makes its logits; send each site's ``a`` to its slice."""
    builder = NodeBuilder(graph, f"group_routing.{index}")
    first = sites[0]
    count, experts, rank = len(sites), first.experts, first.rank
    float_type = first.h.dtype.numpy() if first.h.dtype is not None else np.float32
    i64 = np.int64
    logits = builder.node("Concat", [s.logits for s in sites], {"axis": -1})
    split3 = builder.node("Reshape", [logits.outputs[0], builder.const(np.array([0, 0, count, experts], i64), "s")])
    probs = builder.node("Softmax", [split3.outputs[0]], {"axis": -1})
    top = builder.node(
        "TopK", [probs.outputs[0], builder.const(np.array([first.top_k], i64), "k")], {"axis": -1}, outputs=2
    )
    nodes = [logits, split3, probs, top]
    values = top.outputs[0]
    if first.normalize:
        total = builder.node("ReduceSum", [values, builder.const(np.array([-1], i64), "axes")], {"keepdims": 1})
        div = builder.node("Div", [values, total.outputs[0]])
        nodes += [total, div]
        values = div.outputs[0]
    zero = builder.node("Mul", [probs.outputs[0], builder.const(np.zeros((), float_type), "zero")])
    gates = builder.node("ScatterElements", [zero.outputs[0], top.outputs[1], values], {"axis": -1})
    flat = builder.node("Reshape", [gates.outputs[0], builder.const(np.array([0, 0, count * experts], i64), "s")])
    spread_matrix = np.kron(np.eye(count * experts), np.ones((1, rank))).astype(float_type)
    spread = builder.node("MatMul", [flat.outputs[0], builder.const(spread_matrix, "spread")])
    coefficients = _coefficients(builder, sites)
    gated = builder.node("Mul", [coefficients[-1].outputs[0], spread.outputs[0]])
    sizes = builder.const(np.array([experts * rank] * count, i64), "sizes")
    parts = builder.node("Split", [gated.outputs[0], sizes], {"axis": -1}, outputs=count)
    nodes += [zero, gates, flat, spread, *coefficients, gated, parts]
    anchor = first.logits.producer()
    assert anchor is not None  # _groups keeps only sites whose logits a node makes
    graph.insert_after(anchor, nodes)  # graph.sort() puts any later input first
    for site, part in zip(sites, parts.outputs, strict=True):
        replace_value(site.gate.outputs[0], part)


def group_routed_sites(model: ir.Model) -> ir.passes.PassResult:
    """Route every group of sites that read one input together (in place); ``model.meta["group_routing"]``
    counts the groups."""
    groups = _groups(model.graph)
    model.meta["group_routing"] = len(groups)
    if not groups:
        return ir.passes.PassResult(model, False)
    for index, sites in enumerate(groups):
        _group(model.graph, sites, index)
    common_passes.RemoveUnusedNodesPass()(model)
    model.graph.sort()
    return ir.passes.PassResult(model, True)
