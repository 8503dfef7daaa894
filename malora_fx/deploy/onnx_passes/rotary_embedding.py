"""Map the exported rotary position embedding of queries and keys to onnxruntime's ``RotaryEmbedding``.

torch.onnx writes ``x·cos + rotate_half(x)·sin`` (the Llama / Qwen / Mistral form) as six ops per
tensor::

    Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, h/2:)), Slice(x, :h/2), axis=-1), sin))

with ``x [b, heads, s, h]`` and ``cos``, ``sin [b | 1, 1, s, h]`` computed once from the
``position_ids`` input. This pass replaces each with one ``com.microsoft.RotaryEmbedding(x,
position_ids, cos_cache, sin_cache)`` (non-interleaved, whole head), the kernel onnxruntime-genai's
builder uses.

The caches ``[max_positions, h/2]`` are the graph's own ``cos`` / ``sin`` evaluated (onnx's reference
evaluator) for positions ``0 … max_positions − 1``, so scaled or extended rotary variants give their
own values; a cos/sin that is not a function of the position alone (evaluated twice, in two orders,
it must agree), or whose two halves differ, is left alone. ``max_positions`` comes from
``model.meta["max_positions"]`` (the export sets it from the config's ``max_position_embeddings``);
without it nothing is fused. Positions at or past that bound are outside the cache: the runners
never feed them (they stop at the model's context length).

Not matched: partial rotary (``Slice`` of the rotated part first, e.g. Phi-2), interleaved rotary
(GPT-J), any graph without a ``position_ids`` input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ._values import DOMAIN, const_array, producer_of, replace_value

logger = logging.getLogger(__name__)

POSITIONS_INPUT = "position_ids"
MAX_POSITIONS_KEY = "max_positions"


@dataclass(frozen=True)
class RotaryMatch:
    """One ``x·cos + rotate_half(x)·sin``."""

    x: ir.Value
    cos: ir.Value
    sin: ir.Value
    output: ir.Value
    anchor: ir.Node  # the Add


def _ints(value: ir.Value | None) -> list[int] | None:
    array = const_array(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _half_slice(node: ir.Node | None, x: ir.Value, half: int, first: bool) -> bool:
    """Whether ``node`` is ``x[..., :half]`` (``first``) or ``x[..., half:]`` on the last axis."""
    if node is None or node.inputs[0] is not x or len(node.inputs) < 4:
        return False
    starts, ends, axes = _ints(node.inputs[1]), _ints(node.inputs[2]), _ints(node.inputs[3])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if starts is None or ends is None or axes not in ([3], [-1]) or steps != [1]:
        return False
    return (starts, ends) == ([0], [half]) if first else (starts == [half] and ends[0] >= 2 * half)


def _rotated(value: ir.Value | None, x: ir.Value, half: int) -> bool:
    """Whether ``value`` is ``Concat(Neg(x[..., half:]), x[..., :half], axis=-1)``."""
    concat = producer_of(value, "Concat")
    axis = concat.attributes.get("axis") if concat is not None else None
    if concat is None or axis is None or axis.value not in (-1, 3) or len(concat.inputs) != 2:
        return False
    neg = producer_of(concat.inputs[0], "Neg")
    return (
        neg is not None
        and _half_slice(producer_of(neg.inputs[0], "Slice"), x, half, first=False)
        and _half_slice(producer_of(concat.inputs[1], "Slice"), x, half, first=True)
    )


def _factors(mul: ir.Node | None) -> list[tuple[ir.Value, ir.Value]]:
    if mul is None or mul.inputs[0] is None or mul.inputs[1] is None:
        return []
    a, b = mul.inputs[0], mul.inputs[1]
    return [(a, b), (b, a)]


def match_rotary(add: ir.Node) -> RotaryMatch | None:
    """The rotary region ending at ``add`` (see the module docstring), or None."""
    if add.domain != "" or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    for left, right in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        for x, cos in _factors(producer_of(left, "Mul")):
            shape = x.shape
            head = shape[3] if shape is not None and len(shape) == 4 else None
            if not isinstance(head, int) or head % 2:
                continue
            for rotated, sin in _factors(producer_of(right, "Mul")):
                if _rotated(rotated, x, head // 2):
                    return RotaryMatch(x, cos, sin, add.outputs[0], add)
    return None


def _subgraph(outputs: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes computing ``outputs`` (in graph order) and the graph inputs they read."""
    nodes: dict[int, ir.Node] = {}
    inputs: dict[int, ir.Value] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            if value.is_graph_input():
                inputs[id(value)] = value
            continue
        if id(node) not in nodes:
            nodes[id(node)] = node
            stack.extend(v for v in node.inputs if v is not None)
    graph = outputs[0].graph
    order = {id(n): i for i, n in enumerate(graph)} if graph is not None else {}
    return sorted(nodes.values(), key=lambda n: order.get(id(n), 0)), list(inputs.values())


def _evaluate(model: ir.Model, values: list[ir.Value], positions: np.ndarray) -> list[np.ndarray] | None:
    """``values`` computed for ``position_ids = positions`` ([1, n]), or None when they read another input."""
    from onnx.reference import ReferenceEvaluator

    nodes, inputs = _subgraph(values)
    names = [v.name for v in values]
    if [v.name for v in inputs] != [POSITIONS_INPUT] or None in names:
        return None
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.name and v.is_initializer() and v.const_value is not None:
                initializers[v.name] = ir.serde.serialize_tensor(v.const_value)
                initializers[v.name].name = v.name
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "rotary_tables",
        [onnx.helper.make_tensor_value_info(POSITIONS_INPUT, onnx.TensorProto.INT64, None)],
        [onnx.helper.make_tensor_value_info(str(name), onnx.TensorProto.UNDEFINED, None) for name in names],
        list(initializers.values()),
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    session = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opsets))
    return [np.asarray(a) for a in session.run(None, {POSITIONS_INPUT: positions})]


def rotary_tables(model: ir.Model, cos: ir.Value, sin: ir.Value, max_positions: int) -> tuple[np.ndarray, ...] | None:
    """``(cos_cache, sin_cache)`` ``[max_positions, h/2]`` from the graph's own cos/sin, or None (see module doc)."""
    forward = np.arange(max_positions, dtype=np.int64)[None]
    first = _evaluate(model, [cos, sin], forward)
    second = _evaluate(model, [cos, sin], forward[:, ::-1]) if first is not None else None
    if first is None or second is None:
        return None
    tables = []
    for table, reversed_table in zip(first, second, strict=True):
        if table.ndim != 4 or table.shape[:3] != (1, 1, max_positions):
            return None
        rows = table[0, 0]
        half = rows.shape[-1] // 2
        if not np.array_equal(rows, reversed_table[0, 0][::-1]) or not np.array_equal(rows[:, :half], rows[:, half:]):
            return None
        tables.append(np.ascontiguousarray(rows[:, :half]))
    return tables[0], tables[1]


def fuse_rotary_embedding(model: ir.Model) -> ir.passes.PassResult:
    """Replace every matched rotary of ``model`` (in place); ``model.meta["rotary_embedding"]`` counts them."""
    graph = model.graph
    positions = next((v for v in graph.inputs if v.name == POSITIONS_INPUT), None)
    max_positions = model.meta.get(MAX_POSITIONS_KEY)
    matches = [m for m in (match_rotary(n) for n in graph if n.op_type == "Add") if m is not None]
    model.meta["rotary_embedding"] = 0
    if positions is None or not max_positions or not matches:
        return ir.passes.PassResult(model, False)
    caches: dict[tuple[int, int], tuple[ir.Value, ir.Value] | None] = {}
    fused = 0
    for match in matches:
        key = (id(match.cos), id(match.sin))
        if key not in caches:
            caches[key] = _cache_values(model, match, int(max_positions), len(caches))
        cache = caches[key]
        if cache is None:
            continue
        node = ir.Node(
            DOMAIN,
            "RotaryEmbedding",
            [match.x, positions, cache[0], cache[1]],
            ir.convenience.convert_attributes({"interleaved": 0}),
            num_outputs=1,
            name=f"rotary.{fused}",
        )
        node.outputs[0].name = f"rotary.{fused}.out"
        graph.insert_before(match.anchor, [node])
        replace_value(match.output, node.outputs[0])
        fused += 1
    if fused:
        model.opset_imports.setdefault(DOMAIN, 1)
        common_passes.RemoveUnusedNodesPass()(model)
    model.meta["rotary_embedding"] = fused
    logger.info("rotary embedding: %d of %d matched", fused, len(matches))
    return ir.passes.PassResult(model, bool(fused))


def _cache_values(
    model: ir.Model, match: RotaryMatch, max_positions: int, index: int
) -> tuple[ir.Value, ir.Value] | None:
    """The two cache initializers of ``match``'s cos/sin (registered in the graph), or None."""
    tables = rotary_tables(model, match.cos, match.sin, max_positions)
    if tables is None:
        logger.warning("rotary left unfused: its cos/sin are not a table of the position")
        return None
    dtype = match.x.dtype.numpy() if match.x.dtype is not None else np.dtype(np.float32)
    values = []
    for name, table in zip(("cos", "sin"), tables, strict=True):
        value = ir.Value(name=f"rotary.{name}_cache_{index}", const_value=ir.tensor(table.astype(dtype)))
        model.graph.register_initializer(value)
        values.append(value)
    return values[0], values[1]
