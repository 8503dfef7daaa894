"""Map a decoder's exported attention with KV cache to onnxruntime's ``GroupQueryAttention``.

torch.onnx writes each layer's scaled-dot-product attention as ~30 plain ops: the KV-cache
``Concat``, the repeat-kv ``Unsqueeze``/``Expand``/``Reshape`` of keys and values, ``Q·Kᵀ`` with its
scale split over two ``Mul``, the additive mask, ``Softmax`` with an ``IsNaN``/``Where`` guard, the
product with V and the transpose back to ``[b, s, hidden]``. This pass replaces that region with
one ``com.microsoft.GroupQueryAttention`` node (onnxruntime's fused kernel, the one the
onnxruntime-genai builder emits), which also writes ``present.{i}.key`` / ``.value``.

What it matches (:func:`match_attention`, anchored on each ``Softmax``)::

    scores = MatMul(Mul(Q, c1)?, Mul(Kᵀ, c2)?)      Kᵀ: shape ops only, back to Concat(past_key, K)
    probs  = Where(IsNaN(Softmax(scores + mask?)), 0, ·)?
    out    = Reshape(Transpose(Reshape?(MatMul(probs, V')), [0, 2, 1, 3]))   V': shape ops only, back to
                                                                    Concat(past_value, V); Reshape? keeps the shape

where both ``Concat`` read a graph input (the past) on axis -2 and write a graph output (the
present), the shape ops are only ``Reshape``/``Transpose``/``Expand``/``Unsqueeze`` (on the new
head-group axis 2, as ``repeat_kv`` does: query head ``h`` reads kv head ``h // (heads / kv_heads)``,
the grouping GroupQueryAttention uses)/``Squeeze``/full ``Slice``, and the static shapes say
``Q [b, heads, s, head]``, ``K, V [b, kv_heads, s, head]`` with ``head`` a multiple of 8 (onnxruntime's
requirement). Anything else is left alone.

How it is exact for every batch layout the runners feed (left padding included): rotary stays
outside (``do_rotary=0``; :mod:`.rotary_embedding` fuses it on the ``position_ids`` input, which
GroupQueryAttention's own rotary would ignore for a left-padded first prompt), every row is told
it holds all ``T`` positions (``seqlens_k = T - 1``, ``total_sequence_length = T``, ``T`` the width
of the ``attention_mask`` input; ``query_seqlens = T - past``, without which onnxruntime refuses a
batch of multi-token steps after a past), and the model's own additive mask goes in as ``attention_bias``,
its ``-inf`` clamped to the dtype's lowest finite value: a fully masked row (a padding position)
then averages its keys instead of giving NaN that would reach later layers, and is never read by a
real token. GroupQueryAttention's causal mask agrees with the model's (it is implied by it).

Q, K and V go in as ``[b, s, heads·head]``: when they are a projection output split into heads
(``Transpose(Reshape(y))``) the kernel reads ``y`` itself, and a ``RotaryEmbedding`` of such a split
is redone on ``y`` (its 3-D form, with ``num_heads``), so no Transpose/Reshape pair is left around it.

Not matched: encoders (no past/present), cross-attention, graphs without an ``attention_mask``
input, and layers whose cache is a sliding window (Mistral with ``sliding_window`` set, Gemma 3's
local layers: the past is cropped before the ``Concat``); those keep the plain ops, exact as before.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ._attention import (
    SHAPE_OPS,
    NodeBuilder,
    OutputSide,
    ScoreSide,
    kernel_inputs,
    output_side,
    score_side,
    shape_op_keeps_heads,
    static_dims,
)
from ._values import DOMAIN, replace_value

logger = logging.getLogger(__name__)

MASK_INPUT = "attention_mask"


@dataclass
class AttentionMatch:
    """One layer's attention region, as :func:`match_attention` found it."""

    query: ir.Value  # [b, heads, s, head], rotary applied
    key: ir.Value  # the new keys [b, kv_heads, s, head]
    value: ir.Value  # the new values [b, kv_heads, s, head]
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    mask: ir.Value | None  # additive, [b | 1, 1 | heads, s, T]
    scale: float
    output: ir.Value  # [b, s, heads * head]: what the region computes
    anchor: ir.Node  # the node producing ``output``
    heads: int
    kv_heads: int
    head_size: int


@dataclass(frozen=True)
class _Cache:
    """A KV-cache ``Concat(past, new)`` whose output is the present."""

    past: ir.Value
    new: ir.Value
    present: ir.Value


def _cache_concat(value: ir.Value | None) -> _Cache | None:
    """The KV-cache concat that ``value`` is a reshaping of, or None."""
    while value is not None:
        node = value.producer()
        if node is None or node.domain != "":
            return None
        if node.op_type == "Concat":
            break
        if node.op_type not in SHAPE_OPS or not shape_op_keeps_heads(node):
            return None
        value = node.inputs[0]
    else:
        return None
    axis = node.attributes.get("axis")
    past, new = (node.inputs[0], node.inputs[1]) if len(node.inputs) == 2 else (None, None)
    present = node.outputs[0]
    if past is None or new is None or not past.is_graph_input() or not present.is_graph_output():
        return None
    if axis is None or axis.value not in (-2, 2) or static_dims(present, 4) is None:
        return None
    return _Cache(past, new, present)


def _geometry(scores: ScoreSide, key: _Cache, value: _Cache, out: OutputSide) -> tuple[int, int, int] | None:
    """(heads, kv heads, head size) when the static shapes are those of grouped attention, else None."""
    q, k, v = static_dims(scores.query, 4), static_dims(key.new, 4), static_dims(value.new, 4)
    flat = static_dims(out.reshape.outputs[0], 3)
    if q is None or k is None or v is None or flat is None:
        return None
    heads, head_size, kv_heads = q[1], q[3], k[1]
    if heads is None or head_size is None or kv_heads is None:
        return None
    if k[3] != head_size or [v[1], v[3]] != [kv_heads, head_size]:
        return None
    reshaped = static_dims(out.reshaped, 4) if out.reshaped is not None else q
    if reshaped is None or [reshaped[1], reshaped[3]] != [heads, head_size]:
        return None
    if heads % kv_heads or head_size % 8 or flat[2] != heads * head_size:  # onnxruntime: head size 8k
        return None
    mask = static_dims(scores.mask, 4) if scores.mask is not None else [None, 1]
    if mask is None or mask[1] not in (1, heads):
        return None
    return heads, kv_heads, head_size


def match_attention(softmax: ir.Node) -> AttentionMatch | None:
    """The attention region around ``softmax`` (see the module docstring), or None when it is not one."""
    out, scores = output_side(softmax), score_side(softmax)
    key = _cache_concat(scores.key_t) if scores is not None else None
    value = _cache_concat(out.weighted.inputs[1]) if out is not None else None
    if out is None or scores is None or key is None or value is None or value.present is key.present:
        return None
    geometry = _geometry(scores, key, value, out)
    if geometry is None:
        return None
    heads, kv_heads, head_size = geometry
    return AttentionMatch(
        query=scores.query,
        key=key.new,
        value=value.new,
        past_key=key.past,
        past_value=value.past,
        present_key=key.present,
        present_value=value.present,
        mask=scores.mask,
        scale=scores.scale,
        output=out.reshape.outputs[0],
        anchor=out.reshape,
        heads=heads,
        kv_heads=kv_heads,
        head_size=head_size,
    )


@dataclass
class _Lengths:
    """GroupQueryAttention's length inputs, computed once from graph inputs (int32)."""

    nodes: list[ir.Node]
    seqlens_k: ir.Value  # [b]: T - 1 for every row
    total: ir.Value  # scalar T
    query_seqlens: ir.Value  # [b]: s = T - past for every row


def _lengths(builder: NodeBuilder, mask_input: ir.Value, past_key: ir.Value) -> _Lengths:
    """``T`` is the width of the mask input, the past length the cache axis of one past key."""
    b = builder
    width = b.node("Shape", [mask_input], {"start": 1, "end": 2})
    batch = b.node("Shape", [mask_input], {"start": 0, "end": 1})
    past = b.node("Shape", [past_key], {"start": 2, "end": 3})
    last = b.node("Sub", [width.outputs[0], b.const(np.array([1], np.int64), "one")])
    new = b.node("Sub", [width.outputs[0], past.outputs[0]])
    nodes = [width, batch, past, last, new]

    def per_row(x: ir.Value) -> ir.Value:
        rows = b.node("Expand", [x, batch.outputs[0]])
        cast = b.node("Cast", [rows.outputs[0]], {"to": ir.DataType.INT32})
        nodes.extend([rows, cast])
        return cast.outputs[0]

    seqlens_k, query_seqlens = per_row(last.outputs[0]), per_row(new.outputs[0])
    total_1d = b.node("Cast", [width.outputs[0]], {"to": ir.DataType.INT32})
    total = b.node("Squeeze", [total_1d.outputs[0], b.const(np.array([0], np.int64), "axis0")])
    nodes += [total_1d, total]
    return _Lengths(nodes, seqlens_k, total.outputs[0], query_seqlens)


@functools.cache
def onnxruntime_lacks_gqa() -> str | None:
    """Why the installed onnxruntime cannot run the node this pass writes, or None when it can.

    The node uses ``attention_bias`` and ``query_seqlens`` (a batch of multi-token chunks after a
    past); onnxruntime releases before ``query_seqlens`` refuse it. Without onnxruntime installed
    the graph is written for the current release.
    """
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c
    except ImportError:
        return None
    schemas = [s for s in ort_c.get_all_operator_schema() if s.name == "GroupQueryAttention" and s.domain == DOMAIN]
    inputs = {i.name for s in schemas for i in s.inputs}
    if not {"attention_bias", "query_seqlens"} <= inputs:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}'s GroupQueryAttention has no query_seqlens input"
    return None


def fuse_group_query_attention(model: ir.Model) -> ir.passes.PassResult:
    """Replace every matched attention region of ``model`` (in place); ``model.meta["gqa_attention"]`` counts them.

    Does nothing (with a warning) when the installed onnxruntime cannot run the result
    (:func:`onnxruntime_lacks_gqa`).
    """
    graph = model.graph
    mask_input = next((v for v in graph.inputs if v.name == MASK_INPUT), None)
    matches = [m for m in (match_attention(n) for n in graph if n.op_type == "Softmax") if m is not None]
    lacking = onnxruntime_lacks_gqa() if matches else None
    if lacking:
        logger.warning("attention left unfused: %s (upgrade onnxruntime to fuse it)", lacking)
    if mask_input is None or not matches or lacking:
        model.meta["gqa_attention"] = 0
        return ir.passes.PassResult(model, False)
    builder = NodeBuilder(graph, "gqa")
    lengths = _lengths(builder, mask_input, matches[0].past_key)
    graph.insert_before(next(iter(graph)), lengths.nodes)
    biases: dict[int, ir.Value] = {}
    for match in matches:
        made, qkv, bias = kernel_inputs(builder, match.mask, [match.query, match.key, match.value], biases)
        attention = builder.node(
            "GroupQueryAttention",
            qkv
            + [match.past_key, match.past_value, lengths.seqlens_k, lengths.total, None, None, None, bias]
            + [None] * 5
            + [lengths.query_seqlens],
            {
                "num_heads": match.heads,
                "kv_num_heads": match.kv_heads,
                "scale": match.scale,
                "do_rotary": 0,
            },
            outputs=3,
            domain=DOMAIN,
        )
        graph.insert_before(match.anchor, made + [attention])
        replace_value(match.output, attention.outputs[0])
        replace_value(match.present_key, attention.outputs[1])
        replace_value(match.present_value, attention.outputs[2])
    model.opset_imports.setdefault(DOMAIN, 1)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    graph.sort()
    model.meta["gqa_attention"] = len(matches)
    logger.info("group query attention: %d layers", len(matches))
    return ir.passes.PassResult(model, True)
