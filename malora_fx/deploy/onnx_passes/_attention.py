"""The exported attention region: matching and building shared by :mod:`.gqa_attention` and :mod:`.mha_attention`.

torch.onnx writes scaled-dot-product attention as ``Softmax(Mul(Q, c1)·Mul(Kᵀ, c2) + mask)`` with an
``IsNaN``/``Where`` guard, then ``·V'`` and ``Transpose``/``Reshape`` back to ``[b, s, hidden]``. These
helpers find that region's pieces (:func:`output_side`, :func:`unscaled`) and build onnxruntime's
inputs (:func:`flatten_heads`, :func:`finite_bias`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._values import DOMAIN, const_array, producer_of

SHAPE_OPS = frozenset({"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Slice"})
FULL_SLICE_END = 2**31 - 1  # an end at least this large keeps the whole axis


def only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one node reading ``value`` when it is a default-domain ``op_type``, else None."""
    users = value.consumers()
    if len(users) == 1 and users[0].op_type == op_type and users[0].domain == "":
        return users[0]
    return None


def const_scalar(value: ir.Value) -> float | None:
    """A one-element constant as a float, else None."""
    array = const_array(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def unscaled(value: ir.Value) -> tuple[ir.Value, float] | None:
    """``(x, c)`` for ``value = Mul(x, c)`` with a constant scalar ``c``; ``(value, 1)`` for anything else."""
    node = producer_of(value, "Mul")
    if node is None:
        return value, 1.0
    for x, c in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        factor = const_scalar(c) if c is not None else None
        if factor is not None and x is not None:
            return x, factor
    return None


def shape_op_keeps_heads(node: ir.Node) -> bool:
    """Whether a shape op between a key/value and the attention keeps batch and head order (see :data:`SHAPE_OPS`)."""
    if node.op_type == "Unsqueeze":
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return axes is not None and axes.reshape(-1).tolist() == [2]
    if node.op_type == "Transpose":  # Kᵀ: batch (and, in 4-D, head) axes stay where they are
        perm = node.attributes.get("perm")
        order = list(perm.value) if perm is not None else []
        return len(order) in (3, 4) and order[0] == 0 and (len(order) == 3 or order[1] == 1)
    if node.op_type == "Slice":
        starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        return (
            starts is not None
            and ends is not None
            and bool((starts == 0).all())
            and bool((ends >= FULL_SLICE_END).all())
            and (steps is None or bool((steps == 1).all()))
        )
    return True


def static_dims(value: ir.Value | None, rank: int) -> list[int | None] | None:
    """The dims of a rank-``rank`` value (None for a symbolic one), or None when its rank is another or unknown."""
    shape = value.shape if value is not None else None
    if shape is None or len(shape) != rank:
        return None
    return [d if isinstance(d, int) else None for d in shape]


@dataclass(frozen=True)
class OutputSide:
    """``Reshape(Transpose(Reshape?(MatMul(probs, V'))))``: the product with V back to ``[b, s, hidden]``."""

    weighted: ir.Node  # MatMul(probs, V')
    reshaped: ir.Value | None  # the Reshape? output, which must stay [b, heads, s, head]
    reshape: ir.Node  # its output is the region's output


def output_side(softmax: ir.Node) -> OutputSide | None:
    """The product of ``softmax``'s probabilities with V and its way back to ``[b, s, hidden]``, or None."""
    probs = softmax.outputs[0]
    users = {n.op_type: n for n in probs.consumers() if n.domain == ""}
    if len(probs.consumers()) == 2 and set(users) == {"IsNaN", "Where"}:  # NaN (fully masked rows) → 0
        isnan, where = users["IsNaN"], users["Where"]
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs:
            return None
        probs = where.outputs[0]
    weighted = only_consumer(probs, "MatMul")
    if weighted is None or weighted.inputs[0] is not probs:
        return None
    heads_out, reshaped = weighted.outputs[0], None
    same_shape = only_consumer(heads_out, "Reshape")  # some models re-view [b, heads, s, head] as itself
    if same_shape is not None:
        heads_out = reshaped = same_shape.outputs[0]
    transpose = only_consumer(heads_out, "Transpose")
    perm = transpose.attributes.get("perm") if transpose is not None else None
    if transpose is None or perm is None or list(perm.value) != [0, 2, 1, 3]:
        return None
    reshape = only_consumer(transpose.outputs[0], "Reshape")
    return OutputSide(weighted, reshaped, reshape) if reshape is not None else None


@dataclass(frozen=True)
class ScoreSide:
    """``Softmax(MatMul(Mul(Q, c1)?, Mul(Kᵀ, c2)?) + mask?)``: Q, ``c1·c2``, the mask and Kᵀ."""

    query: ir.Value
    scale: float
    mask: ir.Value | None
    key_t: ir.Value


def score_side(softmax: ir.Node) -> ScoreSide | None:
    """The scores that ``softmax`` (over the last axis) normalizes, or None when they are not ``Q·Kᵀ``."""
    axis = softmax.attributes.get("axis")
    if softmax.domain != "" or (axis is not None and axis.value not in (-1, 3)):
        return None
    scores, mask = softmax.inputs[0], None
    add = producer_of(scores, "Add")
    if add is not None:
        scores, mask = add.inputs[0], add.inputs[1]
    qk = producer_of(scores, "MatMul")
    if qk is None or qk.inputs[0] is None or qk.inputs[1] is None:
        return None
    query, key_t = unscaled(qk.inputs[0]), unscaled(qk.inputs[1])
    if query is None or key_t is None:
        return None
    return ScoreSide(query[0], query[1] * key_t[1], mask, key_t[0])


class NodeBuilder:
    """Adds nodes and constants to ``graph`` with unique names (``<prefix>.*``)."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}.{what}_{self.count}"

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


def unsplit_heads(x: ir.Value) -> ir.Value | None:
    """``y [b, s, n·h]`` when ``x [b, n, s, h]`` is ``Transpose(Reshape(y), [0, 2, 1, 3])``, else None."""
    transpose = producer_of(x, "Transpose")
    perm = transpose.attributes.get("perm") if transpose is not None else None
    if transpose is None or perm is None or list(perm.value) != [0, 2, 1, 3]:
        return None
    reshape = producer_of(transpose.inputs[0], "Reshape")
    y = reshape.inputs[0] if reshape is not None else None
    y_dims, x_dims = static_dims(y, 3), static_dims(x, 4)
    if y is None or y_dims is None or x_dims is None or None in (y_dims[2], x_dims[1], x_dims[3]):
        return None
    return y if y_dims[2] == x_dims[1] * x_dims[3] else None  # type: ignore[operator]  # checked not None


def flatten_heads(builder: NodeBuilder, x: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    """Nodes giving ``x [b, n, s, h]`` as ``[b, s, n·h]``, the layout onnxruntime's attention kernels read.

    When ``x`` is the projection output split into heads, that output is used as it is; when it is a
    ``RotaryEmbedding`` of such a split, the rotary is redone on the projection output (its 3-D form).
    """
    flat = unsplit_heads(x)
    if flat is not None:
        return [], flat
    rotary = x.producer()
    if rotary is not None and (rotary.domain, rotary.op_type) == (DOMAIN, "RotaryEmbedding"):
        source = rotary.inputs[0]
        flat = unsplit_heads(source) if source is not None else None
        dims = static_dims(source, 4)
        if flat is not None and dims is not None and dims[1] is not None and dims[3] is not None:
            attributes = {"interleaved": rotary.attributes.get_int("interleaved", 0)}
            attributes |= {"num_heads": dims[1], "rotary_embedding_dim": dims[3]}
            node = builder.node("RotaryEmbedding", [flat, *rotary.inputs[1:]], attributes, domain=DOMAIN)
            return [node], node.outputs[0]
    flat_shape = builder.const(np.array([0, 0, -1], np.int64), "flat")
    transpose = builder.node("Transpose", [x], {"perm": [0, 2, 1, 3]})
    reshape = builder.node("Reshape", [transpose.outputs[0], flat_shape])
    return [transpose, reshape], reshape.outputs[0]


def finite_bias(builder: NodeBuilder, mask: ir.Value, cache: dict[int, ir.Value]) -> tuple[list[ir.Node], ir.Value]:
    """``Max(mask, lowest finite)``, built once per mask value."""
    if id(mask) in cache:
        return [], cache[id(mask)]
    dtype = mask.dtype.numpy() if mask.dtype is not None else np.dtype(np.float32)
    lowest = builder.const(np.array(np.finfo(dtype).min, dtype), "lowest")
    node = builder.node("Max", [mask, lowest])
    cache[id(mask)] = node.outputs[0]
    return [node], node.outputs[0]


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` right after the node making ``value`` (first in the graph for an input or initializer)."""
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)


def kernel_inputs(
    builder: NodeBuilder, mask: ir.Value | None, tensors: list[ir.Value], biases: dict[int, ir.Value]
) -> tuple[list[ir.Node], list[ir.Value], ir.Value | None]:
    """One region's ``[b, s, heads·head]`` q, k, v and finite bias.

    Returns the nodes to insert before the region's anchor, the three values and the bias (None
    without a mask). A new bias node is inserted right after the mask's producer, once per mask.
    """
    bias = None
    if mask is not None:
        nodes, bias = finite_bias(builder, mask, biases)
        if nodes:
            insert_after_producer(builder.graph, mask, nodes)
    flat = [flatten_heads(builder, v) for v in tensors]
    return [n for made, _ in flat for n in made], [value for _, value in flat], bias
