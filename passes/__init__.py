"""Graph passes of malora-fx, imported as ``malora_fx.passes``: the pass
infrastructure in one module.

* **The pass protocol.** A pass is a small object with ``name``,
  ``requires(gm)`` (raises if the graph is not fit for it), ``call(gm) ->
  PassResult`` (the rewrite) and ``ensures(gm)`` (checks what it promised).
  :func:`run_passes` runs an ordered list, cleans up after every pass that
  changed the graph (dead-code elimination → lint → recompile) and logs one
  line per pass.
* **The graph state.** Every key a pass or stage writes into ``node.meta`` /
  ``gm.meta`` and every submodule name it adds to the GraphModule is a named
  constant below; nothing else spells them.
* **The pass contracts.** :func:`graph_states` reads which of the states
  ``captured``, ``annotated``, ``adapted``, ``merged``, ``lowered``, ``fused``
  a graph is in; every pass declares the states it requires and ensures, and
  ``BasePass.__call__`` checks them before and after the pass
  (:class:`malora_fx.errors.PassContractError`).
* **The pipelines** a reader needs to see are the functions at the bottom of
  this file. A new pass is one new file in this folder plus one line in one of
  them.

The method behind the passes (formulas, why each rewrite is exact) is written
down in ``docs/method.md``; the stages around them in ``docs/architecture.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import fx, nn

from malora_fx.errors import PassContractError

if TYPE_CHECKING:
    from malora_fx.adapters.layers import AdapterLayer

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- graph state
# node.meta keys
PASS_TAG = "malora_fx.pass"  # the name of the pass that made the node
TARGET_KEY = "malora_fx.target"  # an AdapterTarget: this linear output is to be adapted (annotate_targets)
ADAPTED_KEY = "malora_fx.adapted"  # the site FQN: this linear output carries an adapter (insert_adapters)
MERGED_KEY = "malora_fx.merged"  # True: this adapter call is in its merged form (fold_adapters)
# gm.meta keys (written at capture)
OUTPUT_HEADS_KEY = "malora_fx.output_heads"  # module names "all-linear" leaves out
BASE_PARAMETERS_KEY = "malora_fx.base_parameters"  # parameter count of the captured model
EXAMPLE_KWARGS_KEY = "malora_fx.example_kwargs"  # the keyword names the graph was captured with
STATE_KEY = "malora_fx"  # {"config": MALoRAConfig, "sites": {fqn: {in_features, out_features}}} (insert_adapters)
DEFAULT_OUTPUT_HEADS = ("lm_head",)
# submodules of the GraphModule
ADAPTERS_ATTR = "malora_adapters"  # ModuleDict of trainable adapter layers (insert_adapters)
FOLDED_ATTR = "malora_folded"  # ModuleDict of FoldedMixture (fold_adapters)
LOWERED_ATTR = "malora_lowered"  # buffers of lowered adapter tensors, one ONNX initializer each (lower_routing)
CONSTANTS_ATTR = "malora_constants"  # 0/1 spread / repeat matrices shared by sites of one shape (lower_routing)
FUSED_ATTR = "malora_fused"  # concatenated projection weights (fuse_projections)


def adapter_key(fqn: str) -> str:
    """Key of the adapter of module ``fqn`` in the ``ADAPTERS_ATTR`` / ``FOLDED_ATTR`` ModuleDicts."""
    return fqn.replace(".", "__")


def adapter_modules(gm: nn.Module) -> dict[str, AdapterLayer]:
    """``{site fqn: adapter layer}`` of a transformed module (empty if none)."""
    container: Any = getattr(gm, ADAPTERS_ATTR, None)
    if container is None:
        return {}
    return {layer.fqn: layer for layer in container.values()}


# ---------------------------------------------------------------- graph states
# What a graph is, read from its nodes, gm.meta and submodules (graph_states).
# A graph is in one or more of them: "merged, lowered, fused" is a lowered
# graph whose projections were fused; "captured, annotated" is what plan() returns.
CAPTURED = "captured"  # no adapter in any form: a base graph (annotated or fused ones included)
ANNOTATED = "annotated"  # some linear output carries an AdapterTarget not yet inserted (TARGET_KEY)
ADAPTED = "adapted"  # some trainable adapter layer is called in its training form (not MERGED_KEY)
MERGED = "merged"  # adapters were inserted and none is left in training form
LOWERED = "lowered"  # merged, and no adapter module is called any more (plain ops only)
FUSED = "fused"  # projections were concatenated (FUSED_ATTR submodule)
GRAPH_STATES = (CAPTURED, ANNOTATED, ADAPTED, MERGED, LOWERED, FUSED)


def graph_states(gm: fx.GraphModule) -> frozenset[str]:
    """The states (``GRAPH_STATES``) ``gm`` is in, from its nodes, meta and submodules."""
    from malora_fx.adapters.folded import FoldedMixture
    from malora_fx.adapters.layers import AdapterLayer

    states = set()
    has_adapters = bool(getattr(gm, "meta", {}).get(STATE_KEY, {}).get("sites")) or any(
        _holds_tensors(getattr(gm, attr, None)) for attr in (ADAPTERS_ATTR, FOLDED_ATTR, LOWERED_ATTR)
    )
    trainable_calls = module_calls = 0
    for node in gm.graph.nodes:
        if TARGET_KEY in node.meta:
            states.add(ANNOTATED)
        if node.meta.get(ADAPTED_KEY):
            has_adapters = True
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, (AdapterLayer, FoldedMixture)):
                module_calls += 1
                if isinstance(module, AdapterLayer) and not node.meta.get(MERGED_KEY):
                    trainable_calls += 1
    if not has_adapters and not module_calls:
        states.add(CAPTURED)
    elif trainable_calls:
        states.add(ADAPTED)
    else:
        states.add(MERGED)
        if not module_calls:
            states.add(LOWERED)
    if hasattr(gm, FUSED_ATTR):
        states.add(FUSED)
    return frozenset(states)


def _holds_tensors(container: Any) -> bool:
    """Whether an adapter submodule exists and is not empty."""
    return isinstance(container, nn.Module) and any(True for _ in container.state_dict())


def describe_states(states: frozenset[str] | set[str]) -> str:
    """``"merged, lowered"``: the states in pipeline order."""
    return ", ".join(s for s in GRAPH_STATES if s in states) or "(none)"


# ---------------------------------------------------------------- the pass protocol


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the (same) module, whether it changed, how many matches."""

    module: fx.GraphModule
    modified: bool
    matches: int = 0


class GraphPass(Protocol):
    name: str

    def requires(self, gm: fx.GraphModule) -> None: ...

    def call(self, gm: fx.GraphModule) -> PassResult: ...

    def ensures(self, gm: fx.GraphModule) -> None: ...

    def __call__(self, gm: fx.GraphModule) -> PassResult: ...


class BasePass:
    """Default no-op ``requires`` / ``ensures``, the state contract and the call protocol.

    The contract, checked by ``__call__`` with :func:`graph_states`:

    * ``requires_states``: before the pass the graph is in at least one of them
      (empty: any graph);
    * ``refuses_states``: ... and in none of them;
    * ``ensures_states``: after the pass the graph is in at least one of them;
    * ``clears_states``: ... and in none of them.

    ``run_first`` says what to run when the requirement is not met.
    """

    name = "pass"
    requires_states: tuple[str, ...] = ()
    refuses_states: tuple[str, ...] = ()
    ensures_states: tuple[str, ...] = ()
    clears_states: tuple[str, ...] = ()
    run_first = ""

    def requires(self, gm: fx.GraphModule) -> None:
        return None

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        return None

    def check_requires(self, gm: fx.GraphModule) -> None:
        """Raise :class:`PassContractError` unless ``gm`` is in a state this pass runs on."""
        states = graph_states(gm)
        hint = f" ({self.run_first})" if self.run_first else ""
        if self.requires_states and not states & set(self.requires_states):
            raise PassContractError(
                f"{self.name} requires {_a(_either(self.requires_states))} graph{hint}; "
                f"this graph is {describe_states(states)}"
            )
        refused = [s for s in self.refuses_states if s in states]
        if refused:
            raise PassContractError(
                f"{self.name} cannot run on {_a(refused[0])} graph{hint}; this graph is {describe_states(states)}"
            )

    def check_ensures(self, gm: fx.GraphModule) -> None:
        """Raise :class:`PassContractError` unless ``gm`` is in the state this pass promised."""
        states = graph_states(gm)
        left = [s for s in self.clears_states if s in states]
        if (self.ensures_states and not states & set(self.ensures_states)) or left:
            wanted = _either(self.ensures_states) or "any"
            raise PassContractError(
                f"{self.name} left the graph {describe_states(states)}; it ensures {wanted}"
                + (f" and never {', '.join(self.clears_states)}" if self.clears_states else "")
            )

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.check_requires(gm)
        self.requires(gm)
        result = self.call(gm)
        if result.modified:
            cleanup(gm)
        self.ensures(gm)
        self.check_ensures(gm)
        logger.info("%s: %d match(es), %s", self.name, result.matches, "modified" if result.modified else "unchanged")
        return result


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _either(states: Sequence[str]) -> str:
    """``"adapted, merged or captured"``."""
    return " or ".join([", ".join(states[:-1]), states[-1]] if len(states) > 2 else states)


def tag_node(node: fx.Node, source: fx.Node, pass_name: str) -> None:
    """Give a new node the metadata of the node it derives from, plus the pass tag."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "val", "tensor_meta"):
        if key in source.meta:
            node.meta[key] = source.meta[key]
    node.meta[PASS_TAG] = pass_name


def fake_mode_of(node: fx.Node):
    """The FakeTensorMode of ``node``'s ``meta["val"]`` (export-captured graphs), else None."""
    return getattr(node.meta.get("val"), "fake_mode", None)


def emit(graph: fx.Graph, target, args: tuple, source: fx.Node, pass_name: str, fake_mode=None) -> fx.Node:
    """Insert ``call_function(target, args)`` at the graph's insertion point, tagged
    after ``source``; ``meta["val"]`` is recomputed from the inputs' fake values
    when ``fake_mode`` is given and every input node has one."""
    node = graph.call_function(target, args)
    tag_node(node, source, pass_name)
    node.meta.pop("val", None)
    node.meta.pop("tensor_meta", None)
    if fake_mode is not None:
        inputs = node.all_input_nodes  # nodes in lists (``cat``) included
        if all(n.meta.get("val") is not None for n in inputs):
            vals = list(fx.node.map_arg(args, lambda n: n.meta["val"]))
            with fake_mode:
                node.meta["val"] = _fake_value(target, vals)
    return node


def _fake_value(target, vals: list):
    """``target(*vals)`` on fake values; ``x @ W`` with a 2-D ``W`` is built directly as an empty
    ``[*x.shape[:-1], W.shape[1]]``: the matmul decomposition's symbolic reshapes cost ~10 ms a call,
    most of the time of lowering a model with hundreds of sites."""
    if target is torch.ops.aten.matmul.default:
        x, w = vals
        if isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(x, torch.Tensor) and x.dim() >= 2:
            return x.new_empty((*x.shape[:-1], w.shape[1]))
    return target(*vals)


def attach_buffer(gm: fx.GraphModule, container_attr: str, name: str, tensor: torch.Tensor, fake_mode=None) -> fx.Node:
    """Store ``tensor`` (a contiguous copy) as buffer ``gm.<container_attr>.<name>``
    and return a ``get_attr`` node for it at the graph's insertion point."""
    container = getattr(gm, container_attr, None)
    if container is None:
        container = nn.Module()
        gm.add_submodule(container_attr, container)
    container.register_buffer(name, tensor.detach().contiguous().clone())
    return read_attr(gm, f"{container_attr}.{name}", fake_mode)


def read_attr(gm: fx.GraphModule, target: str, fake_mode=None) -> fx.Node:
    """A ``get_attr`` node for the existing tensor ``target`` at the graph's insertion point."""
    node = gm.graph.get_attr(target)
    if fake_mode is not None:
        node.meta["val"] = fake_mode.from_tensor(attr_tensor(gm, target))
    return node


def attr_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    """The tensor (parameter or buffer) at the dotted path ``target``, else None."""
    owner, _, attr = target.rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def get_attr_target(arg) -> str:
    """The dotted target of a ``get_attr`` node, else ``""``."""
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else ""


def constant_of(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` argument, else None."""
    target = get_attr_target(arg)
    return attr_tensor(gm, target) if target else None


def delete_unreferenced(gm: fx.GraphModule, targets: set[str]) -> None:
    """Dead-code eliminate, then delete those of ``targets`` (dotted tensor paths) that no
    ``get_attr`` node reads any more, so an export does not carry them."""
    gm.graph.eliminate_dead_code()
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - still_read:
        owner_name, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        delattr(owner, attr)


def cleanup(gm: fx.GraphModule) -> None:
    """Dead-code elimination, lint, recompile (Torch-TensorRT's cleanup)."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass]) -> list[PassResult]:
    """Run ``passes`` in order on ``gm`` (in place); return their results.

    Each pass checks its state contract before and after it runs
    (``BasePass.__call__``), so a pass given a graph in the wrong state raises
    :class:`malora_fx.errors.PassContractError` naming the pass and the state.
    """
    return [p(gm) for p in passes]


def transform_pipeline(config) -> list[GraphPass]:
    """Capture → adapted graph: annotate targets (policy), insert adapters (mechanism)."""
    from .annotate_targets import AnnotateTargets
    from .insert_adapters import InsertAdapters

    return [AnnotateTargets(config.targets), InsertAdapters(config)]


def merge_pipeline() -> list[GraphPass]:
    """Trained graph → merged graph: fold scales, MALoRA's P and LoRA sites."""
    from .fold_adapters import FoldAdapters

    return [FoldAdapters()]


def lower_pipeline(fold_lora: bool = True, fuse: bool = False, join_up: bool = True) -> list[GraphPass]:
    """Trained or merged graph → static graph: fold (if not yet), lower the routing,
    and (``fuse``) give each lowered up-projection and its base projection one GEMM
    (``join_up``), then concatenate the projections that read the same input as a
    lowered adapter into one GEMM (base-only groups are left alone).

    ``fold_lora=False`` keeps LoRA updates out of the base weights (switchable
    exports); the adapter tensors then stay unfused, so nothing is fused there.
    ``join_up=False`` keeps the up-projections apart (the ``MoE`` kernel export
    matches them there).
    """
    from .fold_adapters import FoldAdapters
    from .fuse_projections import FuseProjections
    from .join_up_projections import JoinUpProjections
    from .lower_routing import LowerRouting

    passes: list[GraphPass] = [FoldAdapters(fold_lora), LowerRouting()]
    if fuse:
        adapters = (f"{LOWERED_ATTR}.",)
        keep_separate = () if fold_lora else adapters
        if join_up:
            passes.append(JoinUpProjections(keep_separate=keep_separate))
        passes.append(FuseProjections(keep_separate=keep_separate, only_groups_reading=adapters))
    return passes
