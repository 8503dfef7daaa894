"""lower_routing — replace every folded routed adapter by plain, static ops.

Matches: ``call_module`` nodes of a :class:`malora_fx.folded.FoldedMixture`
(produced by fold_adapters), and of LoRA layers that were kept out of the base
weight (``FoldAdapters(fold_lora=False)``, for switchable exports), which
become ``(x @ Aᵀ) @ (s·B)ᵀ``.

Produces (DESIGN §3), with the weights as buffers under ``gm.malora_lowered``::

    logits = x @ W_gᵀ                             # [..., N]
    probs  = softmax(logits, -1)
    v, i   = topk(probs, k)                       # (v / sum(v) when normalize_top_k)
    g      = scatter(zeros_like(probs), -1, i, v) # top-k mask, zeros elsewhere
    z      = x @ Dᵀ                               # shared down-projection (if any)
    h      = unflatten(z @ E_catᵀ, (N, r))        # per-expert down (if any), else z per expert
    y      = flatten(h * g[..., None]) @ U_catᵀ   # U_cat ∈ [m, N·r]

Weights are stored transposed (``[in, out]``) and multiplied with ``matmul``,
so each becomes one named ONNX initializer (``malora_lowered.<site>__<name>``)
that a runtime can override.

All aten ops that map to ONNX (MatMul/Gemm, Softmax, TopK, ScatterElements,
Mul, Reshape, Unsqueeze, ReduceSum, Div); no adapter module, no
data-dependent shape, no ``nonzero`` token gathering.

Why exact: masked experts get gate 0, so ``Σ_t g_t U_t h_t`` over all N equals
the sum over the chosen k; ``U_cat (g ⊗ h)`` is that sum written as one GEMM.

Requires: folded adapters (run fold_adapters first). Ensures: no
``FoldedMixture`` is called; unused ones are deleted; idempotent.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from malora_fx.folded import FoldedMixture
from malora_fx.layers import LoRALayer

from . import BasePass, PassResult, tag_node
from .fold_adapters import FOLDED_ATTR
from .insert_adapters import ADAPTERS_ATTR

LOWERED_ATTR = "malora_lowered"
aten = torch.ops.aten

# Every call_function target a lowered adapter may add.
LOWERED_OPS = frozenset({
    aten.matmul.default, aten.softmax.int, aten.topk.default, operator.getitem, aten.zeros_like.default,
    aten.scatter.src, aten.unsqueeze.default, aten.mul.Tensor, aten.flatten.using_ints, aten.unflatten.int,
    aten.sum.dim_IntList, aten.div.Tensor, aten.add.Tensor,
})


class LowerRouting(BasePass):
    name = "lower_routing"

    def call(self, gm: fx.GraphModule) -> PassResult:
        calls = [n for n in gm.graph.nodes
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (FoldedMixture, LoRALayer))]
        for call in calls:
            lowering = _Lowering(gm, call, gm.get_submodule(call.target))
            lowering.run_lora() if isinstance(lowering.folded, LoRALayer) else lowering.run()
        if calls:
            for attr in (FOLDED_ATTR, ADAPTERS_ATTR):
                if hasattr(gm, attr):
                    delattr(gm, attr)
        return PassResult(gm, modified=bool(calls), matches=len(calls))

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FoldedMixture):
                raise AssertionError(f"lower_routing left a routed adapter call: {node.target}")


class _Lowering:
    """Emit the static ops of one folded adapter right before its call node."""

    def __init__(self, gm: fx.GraphModule, call: fx.Node, folded: FoldedMixture) -> None:
        self.gm, self.call, self.folded = gm, call, folded
        self.graph = gm.graph
        self.prefix = call.target.rsplit(".", 1)[-1]
        val = call.args[0].meta.get("val")
        self.fake_mode = getattr(val, "fake_mode", None)

    def run(self) -> None:
        f = self.folded
        x = self.call.args[0]
        with self.graph.inserting_before(self.call):
            probs = self.op(aten.softmax.int, self.matmul(x, "router", f.router), -1)
            top = self.op(aten.topk.default, probs, f.top_k, -1)
            values, indices = self.op(operator.getitem, top, 0), self.op(operator.getitem, top, 1)
            if f.normalize_top_k:
                values = self.op(aten.div.Tensor, values, self.op(aten.sum.dim_IntList, values, [-1], True))
            gates = self.op(aten.scatter.src, self.op(aten.zeros_like.default, probs), -1, indices, values)
            z = x if f.down is None else self.matmul(x, "down", f.down)
            if f.expert_down is None:
                h = self.op(aten.unsqueeze.default, z, -2)  # [..., 1, k]: the same input for every expert
            else:
                flat = self.matmul(z, "expert_down", f.expert_down.flatten(0, 1))
                h = self.op(aten.unflatten.int, flat, -1, [f.num_experts, f.expert_rank])
            gated = self.op(aten.mul.Tensor, h, self.op(aten.unsqueeze.default, gates, -1))
            up = f.up.permute(1, 0, 2).reshape(f.up.shape[1], -1)
            out = self.matmul(self.op(aten.flatten.using_ints, gated, -2, -1), "up", up)
        self.call.replace_all_uses_with(out)
        self.graph.erase_node(self.call)

    @torch.no_grad()
    def run_lora(self) -> None:
        """A LoRA site kept out of the base weight (switchable export): ``(x @ Aᵀ) @ (s·B)ᵀ``."""
        lora = self.folded
        with self.graph.inserting_before(self.call):
            out = self.matmul(self.matmul(self.call.args[0], "down", lora.A), "up", lora.B * lora.scale)
        self.call.replace_all_uses_with(out)
        self.graph.erase_node(self.call)

    def matmul(self, x: fx.Node, name: str, weight: torch.Tensor) -> fx.Node:
        """``x @ Wᵀ`` with ``Wᵀ`` stored as the buffer, so the ONNX initializer keeps
        its name (a ``linear`` weight is transposed and renamed by constant folding)."""
        return self.op(aten.matmul.default, x, self.weight(name, weight.T))

    def weight(self, name: str, tensor: torch.Tensor) -> fx.Node:
        container = getattr(self.gm, LOWERED_ATTR, None)
        if container is None:
            container = nn.Module()
            self.gm.add_submodule(LOWERED_ATTR, container)
        attr = f"{self.prefix}__{name}"
        container.register_buffer(attr, tensor.detach().contiguous().clone())
        node = self.graph.get_attr(f"{LOWERED_ATTR}.{attr}")
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(getattr(container, attr))
        return node

    def op(self, target, *args) -> fx.Node:
        node = self.graph.call_function(target, args)
        tag_node(node, self.call, LowerRouting.name)
        node.meta.pop("val", None)
        node.meta.pop("tensor_meta", None)
        self._propagate_val(node, target, args)
        return node

    def _propagate_val(self, node: fx.Node, target, args) -> None:
        """``meta["val"]`` of a new node from its inputs' fake values, when they have them."""
        if self.fake_mode is None:
            return
        vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
        if any(isinstance(a, fx.Node) and v is None for a, v in zip(args, vals)):
            return
        with self.fake_mode:
            node.meta["val"] = target(*vals)
