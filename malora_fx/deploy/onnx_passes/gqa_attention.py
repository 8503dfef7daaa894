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

from ._values import producer_of, replace_value

logger = logging.getLogger(__name__)

DOMAIN = "com.microsoft"
SHAPE_OPS = frozenset({"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Slice"})
MASK_INPUT = "attention_mask"
FULL_SLICE_END = 2**31 - 1  # an end at least this large keeps the whole axis


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


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    users = value.consumers()
    if len(users) == 1 and users[0].op_type == op_type and users[0].domain == "":
        return users[0]
    return None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = producer_of(value, "Constant")
        attr = node.attributes.get("value") if node is not None else None
        tensor = attr.value if attr is not None else None
    return None if tensor is None else tensor.numpy()


def _scalar(value: ir.Value) -> float | None:
    array = _const(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def _unscaled(value: ir.Value) -> tuple[ir.Value, float] | None:
    """``(x, c)`` for ``value = Mul(x, c)`` with a constant scalar ``c``; ``(value, 1)`` for anything else."""
    node = producer_of(value, "Mul")
    if node is None:
        return value, 1.0
    for x, c in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        factor = _scalar(c) if c is not None else None
        if factor is not None and x is not None:
            return x, factor
    return None


def _shape_op_keeps_heads(node: ir.Node) -> bool:
    """Whether a shape op on the repeat-kv path is one :mod:`this pass <.gqa_attention>` understands."""
    if node.op_type == "Unsqueeze":
        axes = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        return axes is not None and axes.reshape(-1).tolist() == [2]
    if node.op_type == "Transpose":  # Kᵀ: batch (and, in 4-D, head) axes stay where they are
        perm = node.attributes.get("perm")
        order = list(perm.value) if perm is not None else []
        return len(order) in (3, 4) and order[0] == 0 and (len(order) == 3 or order[1] == 1)
    if node.op_type == "Slice":
        starts, ends = _const(node.inputs[1]), _const(node.inputs[2])
        steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        return (
            starts is not None
            and ends is not None
            and bool((starts == 0).all())
            and bool((ends >= FULL_SLICE_END).all())
            and (steps is None or bool((steps == 1).all()))
        )
    return True


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
        if node.op_type not in SHAPE_OPS or not _shape_op_keeps_heads(node):
            return None
        value = node.inputs[0]
    else:
        return None
    axis = node.attributes.get("axis")
    past, new = (node.inputs[0], node.inputs[1]) if len(node.inputs) == 2 else (None, None)
    present = node.outputs[0]
    if past is None or new is None or not past.is_graph_input() or not present.is_graph_output():
        return None
    if axis is None or axis.value not in (-2, 2) or _dims(present, 4) is None:
        return None
    return _Cache(past, new, present)


def _dims(value: ir.Value | None, rank: int) -> list[int | None] | None:
    shape = value.shape if value is not None else None
    if shape is None or len(shape) != rank:
        return None
    return [d if isinstance(d, int) else None for d in shape]


@dataclass(frozen=True)
class _OutputSide:
    """``Reshape(Transpose(Reshape?(MatMul(probs, V'))))``: the product with V back to ``[b, s, hidden]``."""

    weighted: ir.Node  # MatMul(probs, V')
    reshaped: ir.Value | None  # the Reshape? output, which must stay [b, heads, s, head]
    reshape: ir.Node  # its output is the region's output


def _output_side(softmax: ir.Node) -> _OutputSide | None:
    probs = softmax.outputs[0]
    users = {n.op_type: n for n in probs.consumers() if n.domain == ""}
    if len(probs.consumers()) == 2 and set(users) == {"IsNaN", "Where"}:  # NaN (fully masked rows) → 0
        isnan, where = users["IsNaN"], users["Where"]
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs:
            return None
        probs = where.outputs[0]
    weighted = _only_consumer(probs, "MatMul")
    if weighted is None or weighted.inputs[0] is not probs:
        return None
    heads_out, reshaped = weighted.outputs[0], None
    same_shape = _only_consumer(heads_out, "Reshape")  # some models re-view [b, heads, s, head] as itself
    if same_shape is not None:
        heads_out = reshaped = same_shape.outputs[0]
    transpose = _only_consumer(heads_out, "Transpose")
    perm = transpose.attributes.get("perm") if transpose is not None else None
    if transpose is None or perm is None or list(perm.value) != [0, 2, 1, 3]:
        return None
    reshape = _only_consumer(transpose.outputs[0], "Reshape")
    return _OutputSide(weighted, reshaped, reshape) if reshape is not None else None


@dataclass(frozen=True)
class _ScoreSide:
    """``Softmax(MatMul(Mul(Q, c1)?, Mul(Kᵀ, c2)?) + mask?)``."""

    query: ir.Value
    scale: float
    mask: ir.Value | None
    key: _Cache


def _score_side(softmax: ir.Node) -> _ScoreSide | None:
    scores, mask = softmax.inputs[0], None
    add = producer_of(scores, "Add")
    if add is not None:
        scores, mask = add.inputs[0], add.inputs[1]
    qk = producer_of(scores, "MatMul")
    if qk is None or qk.inputs[0] is None or qk.inputs[1] is None:
        return None
    query, key_t = _unscaled(qk.inputs[0]), _unscaled(qk.inputs[1])
    key = _cache_concat(key_t[0]) if key_t is not None else None
    if query is None or key_t is None or key is None:
        return None
    return _ScoreSide(query[0], query[1] * key_t[1], mask, key)


def _geometry(scores: _ScoreSide, value: _Cache, out: _OutputSide) -> tuple[int, int, int] | None:
    """(heads, kv heads, head size) when the static shapes are those of grouped attention, else None."""
    q, k, v = _dims(scores.query, 4), _dims(scores.key.new, 4), _dims(value.new, 4)
    flat = _dims(out.reshape.outputs[0], 3)
    if q is None or k is None or v is None or flat is None:
        return None
    heads, head_size, kv_heads = q[1], q[3], k[1]
    if heads is None or head_size is None or kv_heads is None:
        return None
    if k[3] != head_size or [v[1], v[3]] != [kv_heads, head_size]:
        return None
    reshaped = _dims(out.reshaped, 4) if out.reshaped is not None else q
    if reshaped is None or [reshaped[1], reshaped[3]] != [heads, head_size]:
        return None
    if heads % kv_heads or head_size % 8 or flat[2] != heads * head_size:  # onnxruntime: head size 8k
        return None
    mask = _dims(scores.mask, 4) if scores.mask is not None else [None, 1]
    if mask is None or mask[1] not in (1, heads):
        return None
    return heads, kv_heads, head_size


def match_attention(softmax: ir.Node) -> AttentionMatch | None:
    """The attention region around ``softmax`` (see the module docstring), or None when it is not one."""
    axis = softmax.attributes.get("axis")
    if softmax.domain != "" or (axis is not None and axis.value not in (-1, 3)):
        return None
    out, scores = _output_side(softmax), _score_side(softmax)
    value = _cache_concat(out.weighted.inputs[1]) if out is not None else None
    if out is None or scores is None or value is None or value.present is scores.key.present:
        return None
    geometry = _geometry(scores, value, out)
    if geometry is None:
        return None
    heads, kv_heads, head_size = geometry
    return AttentionMatch(
        query=scores.query,
        key=scores.key.new,
        value=value.new,
        past_key=scores.key.past,
        past_value=value.past,
        present_key=scores.key.present,
        present_value=value.present,
        mask=scores.mask,
        scale=scores.scale,
        output=out.reshape.outputs[0],
        anchor=out.reshape,
        heads=heads,
        kv_heads=kv_heads,
        head_size=head_size,
    )


class _Builder:
    """Adds nodes and constants to ``graph`` with unique names (``gqa.*``)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"gqa.{what}_{self.count}"

    def const(self, array: np.ndarray, what: str) -> ir.Value:
        value = ir.Value(name=self.name(what), const_value=ir.tensor(array))
        self.graph.register_initializer(value)
        return value

    def node(self, op: str, inputs, attributes=None, *, outputs: int = 1, domain: str = "") -> ir.Node:
        attrs = ir.convenience.convert_attributes(attributes or {})
        node = ir.Node(domain, op, inputs, attrs, num_outputs=outputs, name=self.name(op))
        for out in node.outputs:
            out.name = self.name(op.lower())
        return node


@dataclass
class _Lengths:
    """GroupQueryAttention's length inputs, computed once from graph inputs (int32)."""

    nodes: list[ir.Node]
    seqlens_k: ir.Value  # [b]: T - 1 for every row
    total: ir.Value  # scalar T
    query_seqlens: ir.Value  # [b]: s = T - past for every row


def _lengths(builder: _Builder, mask_input: ir.Value, past_key: ir.Value) -> _Lengths:
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


def _unsplit_heads(x: ir.Value) -> ir.Value | None:
    """``y [b, s, n·h]`` when ``x [b, n, s, h]`` is ``Transpose(Reshape(y), [0, 2, 1, 3])``, else None."""
    transpose = producer_of(x, "Transpose")
    perm = transpose.attributes.get("perm") if transpose is not None else None
    if transpose is None or perm is None or list(perm.value) != [0, 2, 1, 3]:
        return None
    reshape = producer_of(transpose.inputs[0], "Reshape")
    y = reshape.inputs[0] if reshape is not None else None
    y_dims, x_dims = _dims(y, 3), _dims(x, 4)
    if y is None or y_dims is None or x_dims is None or None in (y_dims[2], x_dims[1], x_dims[3]):
        return None
    return y if y_dims[2] == x_dims[1] * x_dims[3] else None  # type: ignore[operator]  # checked not None


def _flatten_heads(builder: _Builder, x: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    """Nodes giving ``x [b, n, s, h]`` as ``[b, s, n·h]``, GroupQueryAttention's layout.

    When ``x`` is the projection output split into heads, that output is used as it is; when it is a
    ``RotaryEmbedding`` of such a split, the rotary is redone on the projection output (its 3-D form).
    """
    flat = _unsplit_heads(x)
    if flat is not None:
        return [], flat
    rotary = x.producer()
    if rotary is not None and (rotary.domain, rotary.op_type) == (DOMAIN, "RotaryEmbedding"):
        source = rotary.inputs[0]
        flat = _unsplit_heads(source) if source is not None else None
        dims = _dims(source, 4)
        if flat is not None and dims is not None and dims[1] is not None and dims[3] is not None:
            attributes = {"interleaved": rotary.attributes.get_int("interleaved", 0)}
            attributes |= {"num_heads": dims[1], "rotary_embedding_dim": dims[3]}
            node = builder.node("RotaryEmbedding", [flat, *rotary.inputs[1:]], attributes, domain=DOMAIN)
            return [node], node.outputs[0]
    flat_shape = builder.const(np.array([0, 0, -1], np.int64), "flat")
    transpose = builder.node("Transpose", [x], {"perm": [0, 2, 1, 3]})
    reshape = builder.node("Reshape", [transpose.outputs[0], flat_shape])
    return [transpose, reshape], reshape.outputs[0]


def _finite_bias(builder: _Builder, mask: ir.Value, cache: dict[int, ir.Value]) -> tuple[list[ir.Node], ir.Value]:
    """``Max(mask, lowest finite)``, built once per mask value."""
    if id(mask) in cache:
        return [], cache[id(mask)]
    dtype = mask.dtype.numpy() if mask.dtype is not None else np.dtype(np.float32)
    lowest = builder.const(np.array(np.finfo(dtype).min, dtype), "lowest")
    node = builder.node("Max", [mask, lowest])
    cache[id(mask)] = node.outputs[0]
    return [node], node.outputs[0]


def _insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)


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
    builder = _Builder(graph)
    lengths = _lengths(builder, mask_input, matches[0].past_key)
    graph.insert_before(next(iter(graph)), lengths.nodes)
    biases: dict[int, ir.Value] = {}
    for match in matches:
        bias = None
        if match.mask is not None:
            nodes, bias = _finite_bias(builder, match.mask, biases)
            if nodes:
                _insert_after_producer(graph, match.mask, nodes)
        flat = [_flatten_heads(builder, v) for v in (match.query, match.key, match.value)]
        attention = builder.node(
            "GroupQueryAttention",
            [value for _, value in flat]
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
        graph.insert_before(match.anchor, [n for nodes, _ in flat for n in nodes] + [attention])
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
