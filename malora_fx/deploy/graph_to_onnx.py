"""Translate a captured GraphModule to ONNX without tracing it again.

``torch.onnx.export(gm, dynamo=True)`` traces ``gm`` with ``torch.export`` once more and then runs
``run_decompositions``, a second full trace, before translating each node: on SmolLM2-135M with its KV
cache that is ~65 s of symbolic-shape arithmetic for ~2 s of translation. A graph the passes produced
is already what that translation needs: ATen ops whose ``meta["val"]`` fake tensors carry the
symbolic shapes of the first capture (:func:`malora_fx.passes.emit` keeps them on every node it adds).

:func:`translate_graph` therefore hands the graph to torch.onnx's own per-node translation directly:

1. **Normalise** what only the training IR of ``torch.export`` holds and the translation has no ONNX
   function for: the input guard call and shape assertions are dropped; ``detach_``,
   ``lift_fresh_copy`` and ``alias`` pass their input through; ``to`` becomes ``_to_copy`` (or the
   input, when the dtype does not change); ``__and__`` / ``__or__`` become ``bitwise_and`` / ``_or``.
2. **Lift** every tensor the graph reads with ``get_attr`` into an input of an ``ExportedProgram``
   (parameters, buffers, other tensors as constants), named by its dotted path, so the ONNX
   initializers keep the names ``torch.onnx.export`` gives them.
3. **Promote types** as torch.onnx does (explicit casts where an op mixes dtypes), reusing the
   fake values already on the nodes instead of running every node again.
4. **Translate** with torch.onnx's registry, then name the inputs and outputs.

Contract: the result is the ONNX graph ``torch.onnx.export(..., optimize=False)`` gives for the same
GraphModule, up to the names of folded constants (same nodes; the tests compare both). When the graph
holds anything this does not cover — a submodule call, a higher-order op, an op without an ONNX
function, an in-place op, a node without a fake value, outputs that are not a flat list of tensors —
:func:`translate_graph` returns ``None`` with the reason logged, and the caller uses
``torch.onnx.export``; so it does, with a warning, when the translation itself fails. It uses
torch.onnx internals (``_core``, ``_registration``, the type-promotion interpreter);
:func:`direct_translation_available` says whether this torch has them.
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any, cast

import torch
from torch import fx
from torch.export import graph_signature as sig

from ..errors import first_line
from ..passes import attr_tensor

logger = logging.getLogger(__name__)

aten = torch.ops.aten

GUARDS_MODULE = "_guards_fn"  # the input-shape check ExportedProgram.module() calls first
DROPPED = frozenset(
    {
        aten._assert_tensor_metadata.default,
        aten._assert_scalar.default,
        aten.sym_constrain_range_for_size.default,
        aten._assert_async.default,
        aten._assert_async.msg,
    }
)
PASSED_THROUGH = frozenset(
    {aten.detach_.default, aten.detach.default, aten.lift_fresh_copy.default, aten.alias.default}
)
CASTS = frozenset({aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other})
RENAMED = {aten.__and__.Tensor: aten.bitwise_and.Tensor, aten.__or__.Tensor: aten.bitwise_or.Tensor}
TRANSLATED_APART = frozenset({operator.getitem})  # the translation picks an output of a multi-output op itself


def direct_translation_available() -> bool:
    """Whether this torch has the torch.onnx internals :func:`translate_graph` uses."""
    try:
        _internals()
    except (ImportError, AttributeError):
        return False
    return True


def _internals():
    from torch.onnx._internal.exporter import _core, _ir_passes, _registration
    from torch.onnx._internal.fx.passes import type_promotion

    for module, name in [
        (_core, "_exported_program_to_onnx_program"),
        (_ir_passes, "rename_inputs"),
        (type_promotion, "_TypePromotionInterpreter"),
        (type_promotion, "get_type_promotion_rule"),
    ]:
        getattr(module, name)
    return _core, _ir_passes, _registration, type_promotion


@functools.lru_cache(maxsize=4)
def _registry(opset: int):
    _, _, registration, _ = _internals()
    return registration.ONNXRegistry.from_torchlib(opset_version=opset)


def translate_graph(gm: fx.GraphModule, input_names: list[str], output_names: list[str], opset: int = 18):
    """An ``ONNXProgram`` of ``gm`` (captured with ``torch.export``, rewritten by the passes or not),
    inputs and outputs named in order; ``None`` (reason logged) when only ``torch.onnx.export`` can
    translate it. ``gm`` is left as it is: the rewrites happen on a copy of its graph (the tensors are shared).
    """
    if not direct_translation_available():
        return _refuse("this torch lacks the torch.onnx internals it uses")
    try:
        registry = _registry(opset)
        outputs = output_nodes(gm, output_names)
        reason = _unsupported(gm, input_names, output_names, outputs) or _untranslatable(gm.graph, registry)
        if reason:
            return _refuse(reason)
        copy = _graph_copy(gm, cast(list[fx.Node], outputs))  # not None: _unsupported refuses that
        return _translate(copy, input_names, output_names, registry)
    except Exception as exc:  # torch.onnx internals of another torch version, an op this has not met
        logger.warning("direct ONNX translation failed (%s); tracing with torch.onnx.export", first_line(exc))
        return None


def _translate(copy: fx.GraphModule, input_names: list[str], output_names: list[str], registry):
    """Steps 1-4 of the module docstring on ``copy`` (rewritten in place; step 1 drops the assertions)."""
    _normalise(copy.graph)
    program = _lift(copy)
    _promote_types(program.graph_module)
    core, ir_passes, _, _ = _internals()
    onnx_program = core._exported_program_to_onnx_program(program, registry=registry)
    ir_passes.rename_inputs(onnx_program.model, input_names)
    ir_passes.rename_outputs(onnx_program.model, output_names)
    return onnx_program


def _graph_copy(gm: fx.GraphModule, outputs: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph returning (copies of) ``outputs``; node metadata is
    copied, tensors and submodules are shared."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, copies)
    graph.output(tuple(copies[n] for n in outputs))
    copy = fx.GraphModule(gm, graph)
    copy.graph.eliminate_dead_code()  # what only an unused output needed (a BERT's pooler)
    return copy


def _refuse(reason: str) -> None:
    logger.info("direct ONNX translation not used: %s; tracing with torch.onnx.export", reason)
    return None


def _unsupported(
    gm: fx.GraphModule, input_names: list[str], output_names: list[str], outputs: list[fx.Node] | None
) -> str | None:
    """Why ``gm`` (whose :func:`output_nodes` are ``outputs``) is not a flat torch.export graph this module
    translates (None when it is)."""
    graph = gm.graph
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(input_names):
        return f"{len(inputs)} graph inputs for {len(input_names)} names"
    if set(inputs) == set(input_names) and inputs != list(input_names):
        return f"the inputs are named in another order than the graph's ({', '.join(inputs)})"
    if outputs is None:
        return f"the graph's outputs are not {len(output_names)} flat values or fields named {', '.join(output_names)}"
    if not all(isinstance(a.meta.get("val"), torch.Tensor) for a in outputs):
        return "an output is not a tensor"
    for node in graph.nodes:
        if node.op == "call_module" and not (node.target == GUARDS_MODULE and not node.users):
            return f"a call of submodule {node.target!r}"
        if node.op == "call_method":
            return f"a call of method {node.target!r}"
        if node.op == "get_attr":
            reason = _stale_value(node, attr_tensor(gm, str(node.target)))
            if reason:
                return reason
        if node.op == "call_function" and node.target not in DROPPED and node.meta.get("val") is None:
            return f"node {node.name} ({node.target}) has no fake value"
    return None


def output_nodes(gm: fx.GraphModule, output_names: list[str]) -> list[fx.Node] | None:
    """The graph's output nodes for ``output_names``: all of them in order when there are as many, else
    the named fields of the model output the graph returns (``last_hidden_state`` of a BERT that returns
    ``pooler_output`` too); None when neither fits."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = output.args[0]
    if not isinstance(flat, (tuple, list)) or not all(isinstance(a, fx.Node) for a in flat):
        return None
    if len(flat) == len(output_names):
        return list(flat)
    spec = getattr(gm, "_out_spec", None)
    fields = getattr(spec, "context", None)
    leaves = getattr(spec, "num_leaves", None)
    if not isinstance(fields, list) or leaves != len(flat) or len(fields) != len(flat):
        return None
    if not all(name in fields for name in output_names):
        return None
    return [flat[fields.index(name)] for name in output_names]


def _stale_value(node: fx.Node, tensor: torch.Tensor | None) -> str | None:
    """Why the tensor a ``get_attr`` reads does not fit the value traced for it (a cast after capture)."""
    if tensor is None:
        return f"get_attr {node.target!r} is not a tensor"
    traced = node.meta.get("val")
    if isinstance(traced, torch.Tensor) and (traced.dtype != tensor.dtype or traced.shape != tensor.shape):
        now, then = f"{tensor.dtype} {list(tensor.shape)}", f"{traced.dtype} {list(traced.shape)}"
        return f"{node.target} is {now} but was traced as {then}"
    return None


def _normalise(graph: fx.Graph) -> None:
    """Rewrite the training-IR nodes the translation has no ONNX function for (module docstring, step 1)."""
    for node in list(graph.nodes):
        if node.op == "call_module":  # the unused guard call (_unsupported refused every other one)
            graph.erase_node(node)
        elif node.op != "call_function":
            continue
        elif node.target in DROPPED:
            graph.erase_node(node)
        elif node.target in PASSED_THROUGH:
            _bypass(graph, node)
        elif node.target in CASTS:
            _retype(graph, node)
        elif node.target in RENAMED:
            node.target = RENAMED[node.target]


def _bypass(graph: fx.Graph, node: fx.Node) -> None:
    node.replace_all_uses_with(cast(fx.Node, node.args[0]))
    graph.erase_node(node)


def _retype(graph: fx.Graph, node: fx.Node) -> None:
    """``x.to(...)``: the input itself when the dtype stays, else ``_to_copy(x, dtype=...)`` (one device)."""
    source = cast(fx.Node, node.args[0])
    if node.target is aten.to.other:
        dtype = cast(fx.Node, node.args[1]).meta["val"].dtype
    else:
        dtype = node.kwargs.get("dtype") or next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None)
    if dtype is None or source.meta["val"].dtype == dtype:
        _bypass(graph, node)
        return
    with graph.inserting_before(node):
        copy = graph.call_function(aten._to_copy.default, (source,), {"dtype": dtype})
    copy.meta = dict(node.meta)
    node.replace_all_uses_with(copy)
    graph.erase_node(node)


def _untranslatable(graph: fx.Graph, registry) -> str | None:
    """The first op the translation cannot take as it is (None when every one is fine)."""
    normalised = DROPPED | PASSED_THROUGH | CASTS
    for node in graph.nodes:
        if node.op != "call_function" or node.target in TRANSLATED_APART or node.target in normalised:
            continue
        target = RENAMED.get(node.target, node.target)
        if isinstance(target, torch._ops.HigherOrderOperator):
            return f"higher-order op {target.name()}"
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            return f"in-place op {target}"
        if not registry.is_registered(target):
            return f"no ONNX function for {target}"
    return None


def _lift(gm: fx.GraphModule) -> torch.export.ExportedProgram:
    """An ExportedProgram of ``gm`` whose ``get_attr`` tensors are inputs (module docstring, step 2)."""
    graph = gm.graph
    first_input = next(n for n in graph.nodes if n.op == "placeholder")
    parameters = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    fake_mode = next(n.meta["val"].fake_mode for n in graph.nodes if hasattr(n.meta.get("val"), "fake_mode"))
    lifted: dict[str, fx.Node] = {}
    specs: list[sig.InputSpec] = []
    state: dict[str, torch.Tensor] = {}
    constants: dict[str, Any] = {}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        target = str(node.target)
        if target not in lifted:
            tensor = attr_tensor(gm, target)
            assert tensor is not None  # _unsupported refused every other get_attr
            with graph.inserting_before(first_input):
                lifted[target] = graph.placeholder("c_" + target.replace(".", "_"))
            value = node.meta.get("val")
            lifted[target].meta["val"] = (
                value if value is not None else fake_mode.from_tensor(tensor, static_shapes=True)
            )
            kind = (
                sig.InputKind.PARAMETER
                if target in parameters
                else sig.InputKind.BUFFER
                if target in buffers
                else sig.InputKind.CONSTANT_TENSOR
            )
            (state if kind != sig.InputKind.CONSTANT_TENSOR else constants)[target] = tensor
            persistent = True if kind == sig.InputKind.BUFFER else None
            specs.append(sig.InputSpec(kind, sig.TensorArgument(lifted[target].name), target, persistent))
        node.replace_all_uses_with(lifted[target])
        graph.erase_node(node)
    users = [n for n in graph.nodes if n.op == "placeholder" and n not in lifted.values()]
    specs += [sig.InputSpec(sig.InputKind.USER_INPUT, sig.TensorArgument(n.name), None) for n in users]
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = [sig.OutputSpec(sig.OutputKind.USER_OUTPUT, sig.TensorArgument(a.name), None) for a in output.args[0]]
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs: no pytree (un)flattening
    gm.recompile()
    return torch.export.ExportedProgram(
        root=gm,
        graph=graph,
        graph_signature=sig.ExportGraphSignature(specs, outputs),
        state_dict=state,
        range_constraints={},
        module_call_graph=[],
        constants=constants,
    )


def _promote_types(gm: fx.GraphModule) -> None:
    """torch.onnx's explicit type promotion (casts where an op mixes dtypes), run on the fake values the
    nodes already carry: only a node it changes is run again (module docstring, step 3)."""
    _, _, _, type_promotion = _internals()

    interpreter: Any = type_promotion._TypePromotionInterpreter

    class _KnownValues(interpreter):
        def run_node(self, node: fx.Node) -> Any:
            with self._set_current_node(node):
                rule = type_promotion.get_type_promotion_rule(node, self.type_promotion_table)
                if rule:
                    self._maybe_promote_node(node, rule)  # re-runs (and re-annotates) what it changes
            if node.op == "call_function" and node.meta.get("val") is not None:
                return node.meta["val"]
            return fx.Interpreter.run_node(self, node)  # placeholders, output

    promotion = type_promotion.InsertTypePromotion(gm)
    promotion.interpreter = _KnownValues(gm, type_promotion.TypePromotionTable())
    promotion.run()
