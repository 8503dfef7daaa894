"""Map attention without a KV cache (encoders, decoders exported with ``--no-cache``) to ``MultiHeadAttention``.

What it matches (:func:`match_attention`, anchored on each ``Softmax`` that :mod:`.gqa_attention`
left, i.e. attention that reads no cache)::

    scores = MatMul(Mul(Q, c1)?, Mul(Kᵀ, c2)?)     Kᵀ: shape ops only, back to K
    probs  = Where(IsNaN(Softmax(scores + mask?)), 0, ·)?
    out    = Reshape(Transpose(Reshape?(MatMul(probs, V)), [0, 2, 1, 3]))

where ``Q``, ``K`` and ``V`` are each ``[b, heads, s, head]`` with the same number of heads, and
``Kᵀ`` is ``K`` through the shape ops of :data:`._attention.SHAPE_OPS` that keep batch and head order.
It is replaced by one ``com.microsoft.MultiHeadAttention(Q, K, V, attention_bias=mask)`` reading
``[b, s, heads·head]`` inputs (projection outputs as they are when Q, K, V are their head splits),
with the model's scale and its own additive mask (padding, causal for a decoder), ``-inf`` clamped to
the lowest finite float as in :mod:`.gqa_attention`. Rows whose every key is masked (padding
positions) then average their keys rather than give 0; no real token reads them.

Only float32 graphs: onnxruntime's CPU provider has no float16 MultiHeadAttention kernel, and the
export does not know which provider will run it. Head sizes that onnxruntime refuses (not a multiple
of 8) are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ._attention import (
    SHAPE_OPS,
    NodeBuilder,
    kernel_inputs,
    output_side,
    score_side,
    shape_op_keeps_heads,
    static_dims,
    unsplit_heads,
)
from ._values import DOMAIN, replace_value

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadsMatch:
    """One attention region without a cache."""

    query: ir.Value  # [b, heads, s, head]
    key: ir.Value  # [b, heads, t, head]
    value: ir.Value  # [b, heads, t, head]
    mask: ir.Value | None  # additive, [b | 1, 1 | heads, s, t]
    scale: float
    output: ir.Value  # [b, s, heads·head]
    anchor: ir.Node
    heads: int


def _split_heads_source(value: ir.Value | None) -> ir.Value | None:
    """The ``[b, heads, t, head]`` value that ``value`` reshapes (through shape ops that keep heads), or None.

    The walk stops at the first value that is a head split of a projection output (:func:`unsplit_heads`).
    """
    while value is not None:
        if unsplit_heads(value) is not None:
            return value
        node = value.producer()
        if node is None or node.domain != "" or node.op_type not in SHAPE_OPS or not shape_op_keeps_heads(node):
            return None
        if node.op_type in ("Expand", "Unsqueeze"):  # a repeat of kv heads: grouped attention, not this pass
            return None
        value = node.inputs[0]
    return None


def _heads_and_size(values: list[ir.Value]) -> tuple[int, int] | None:
    """(heads, head size) when every value is ``[b, heads, ·, head]`` with the same static heads and size."""
    shapes = set()
    for value in values:
        dims = static_dims(value, 4)
        if dims is None or dims[1] is None or dims[3] is None:
            return None
        shapes.add((dims[1], dims[3]))
    return shapes.pop() if len(shapes) == 1 else None


def match_attention(softmax: ir.Node) -> HeadsMatch | None:
    """The cache-free attention region around ``softmax`` (see the module docstring), or None."""
    out, scores = output_side(softmax), score_side(softmax)
    key = _split_heads_source(scores.key_t) if scores is not None else None
    value = _split_heads_source(out.weighted.inputs[1]) if out is not None else None
    if out is None or scores is None or key is None or value is None:
        return None
    geometry = _heads_and_size([scores.query, key, value])
    flat = static_dims(out.reshape.outputs[0], 3)
    if geometry is None or flat is None or geometry[1] % 8 or flat[2] != geometry[0] * geometry[1]:
        return None
    heads = geometry[0]
    if scores.mask is not None and (static_dims(scores.mask, 4) or [0, 0])[1] not in (1, heads):
        return None
    output = out.reshape.outputs[0]
    return HeadsMatch(scores.query, key, value, scores.mask, scores.scale, output, out.reshape, heads)


def fuse_multi_head_attention(model: ir.Model) -> ir.passes.PassResult:
    """Replace every matched region of a float32 ``model`` (in place); ``model.meta["mha_attention"]`` counts them."""
    graph = model.graph
    matches = [m for m in (match_attention(n) for n in graph if n.op_type == "Softmax") if m is not None]
    matches = [m for m in matches if m.query.dtype == ir.DataType.FLOAT]
    model.meta["mha_attention"] = len(matches)
    if not matches:
        return ir.passes.PassResult(model, False)
    builder = NodeBuilder(graph, "mha")
    biases: dict[int, ir.Value] = {}
    for match in matches:
        made, qkv, bias = kernel_inputs(builder, match.mask, [match.query, match.key, match.value], biases)
        attention = builder.node(
            "MultiHeadAttention",
            qkv + [None, None, bias],
            {"num_heads": match.heads, "scale": match.scale},
            domain=DOMAIN,
        )
        graph.insert_before(match.anchor, made + [attention])
        replace_value(match.output, attention.outputs[0])
    model.opset_imports.setdefault(DOMAIN, 1)
    common_passes.RemoveUnusedNodesPass()(model)
    graph.sort()
    logger.info("multi-head attention: %d layers", len(matches))
    return ir.passes.PassResult(model, True)
