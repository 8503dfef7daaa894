"""lower_routing — replace every folded routed adapter by plain, static ops.

Matches: ``call_module`` nodes of a :class:`malora_fx.adapters.folded.FoldedMixture`
(produced by fold_adapters), and of LoRA layers that were kept out of the base
weight (``FoldAdapters(fold_lora=False)``, for switchable exports), which
become ``(x @ Aᵀ) @ (s·B)ᵀ``.

Produces (see docs/method.md, 'Lowering'), with the weights as buffers under ``gm.malora_lowered``::

    logits = x @ W_gᵀ                             # [..., N]
    probs  = softmax(logits, -1)
    v, i   = topk(probs, k)                       # (v / sum(v) when normalize_top_k)
    g      = scatter(probs * 0, -1, i, v)         # top-k gates, zeros elsewhere
    z      = x @ Dᵀ                               # shared down-projection (if any)
    h      = z @ E_catᵀ                           # [..., N·r] per-expert down (if any), else z @ repeat
    y      = (h * (g @ spread)) @ U_catᵀ          # U_cat ∈ [m, N·r]

``spread`` ([N, N·r], 0/1) repeats each expert's gate over its r columns and
``repeat`` ([r, N·r]) writes z once per expert; these constants are shared by
all sites of a shape under ``gm.malora_constants``. Matmuls by them replace
the unsqueeze/reshape chain of the einsum: fewer ONNX nodes per site (11
instead of 14) and no shape computations, which is what a decode step pays
for (measured with ``tools/bench_fusion.py``).

Adapter weights are stored transposed (``[in, out]``) and multiplied with
``matmul``, so each becomes one named ONNX initializer
(``malora_lowered.<site>__<name>``) that a runtime can override.

Only aten ops that map to ONNX (MatMul, Softmax, TopK, ScatterElements, Mul,
ReduceSum, Div; ``LOWERED_OPS``); no adapter module, no data-dependent shape,
no ``nonzero`` token gathering.

Why exact: masked experts get gate 0, so ``Σ_t g_t U_t h_t`` over all N equals
the sum over the chosen k; ``U_cat (g ⊗ h)`` is that sum written as one GEMM.

Requires: a merged graph (run fold_adapters, i.e. ``merge``, first; a
captured graph without adapters passes through), not an adapted or annotated
one: a trainable routed adapter left in the graph would otherwise be skipped
silently. Ensures: a lowered (or captured) graph, no adapter module called;
unused ones are deleted; idempotent.
"""

from __future__ import annotations

import operator
from typing import cast

import torch
from torch import fx

from malora_fx.adapters.folded import FoldedMixture
from malora_fx.adapters.layers import LoRALayer

from . import (
    ADAPTED,
    ADAPTERS_ATTR,
    ANNOTATED,
    CAPTURED,
    CONSTANTS_ATTR,
    FOLDED_ATTR,
    LOWERED,
    LOWERED_ATTR,
    MERGED,
    BasePass,
    PassResult,
    attach_buffer,
    emit,
    fake_mode_of,
    read_attr,
)

aten = torch.ops.aten

# Every call_function target a lowered adapter may add.
LOWERED_OPS = frozenset(
    {
        aten.matmul.default,
        aten.softmax.int,
        aten.topk.default,
        operator.getitem,
        aten.scatter.src,
        aten.mul.Tensor,
        aten.sum.dim_IntList,
        aten.div.Tensor,
    }
)


class LowerRouting(BasePass):
    name = "lower_routing"
    requires_states = (MERGED, CAPTURED)
    refuses_states = (ANNOTATED,)
    ensures_states = (LOWERED, CAPTURED)
    clears_states = (ADAPTED,)
    run_first = "run merge first"

    def call(self, gm: fx.GraphModule) -> PassResult:
        calls = [
            n
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (FoldedMixture, LoRALayer))
        ]
        for call in calls:
            module = gm.get_submodule(call.target)
            lowering = _Lowering(gm, call, module)  # type: ignore[arg-type]  # filtered above
            lowering.run_lora() if isinstance(module, LoRALayer) else lowering.run()
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

    def __init__(self, gm: fx.GraphModule, call: fx.Node, folded: FoldedMixture | LoRALayer) -> None:
        self.gm, self.call, self.folded = gm, call, folded
        self.graph = gm.graph
        self.x = cast(fx.Node, call.args[0])
        self.prefix = str(call.target).rsplit(".", 1)[-1]
        self.fake_mode = fake_mode_of(self.x)
        # the site's activation dtype where the graph records it: adapters folded in float32 for a float16
        # model are stored in float16, so the graph's dtypes (and its fake values) agree with its tensors
        traced = self.x.meta.get("val")
        own = folded.up.dtype if isinstance(folded, FoldedMixture) else folded.B.dtype
        self.dtype = traced.dtype if isinstance(traced, torch.Tensor) and traced.is_floating_point() else own

    def run(self) -> None:
        f = cast(FoldedMixture, self.folded)
        x = self.x
        n, r = f.num_experts, f.expert_rank
        with self.graph.inserting_before(self.call):
            probs = self.op(aten.softmax.int, self.matmul(x, "router", f.router), -1)
            top = self.op(aten.topk.default, probs, f.top_k, -1)
            values, indices = self.op(operator.getitem, top, 0), self.op(operator.getitem, top, 1)
            if f.normalize_top_k:
                values = self.op(aten.div.Tensor, values, self.op(aten.sum.dim_IntList, values, [-1], True))
            zeros = self.op(aten.mul.Tensor, probs, 0.0)  # one Mul; zeros_like exports as Shape + Expand
            gates = self.op(aten.scatter.src, zeros, -1, indices, values)
            spread = self.op(aten.matmul.default, gates, self.constant(f"spread_{n}x{r}", _spread(n, r)))
            z = x if f.down is None else self.matmul(x, "down", f.down)
            if f.expert_down is None:  # every expert reads z itself: repeat it N times
                h = self.op(aten.matmul.default, z, self.constant(f"repeat_{r}x{n}", _repeat(n, r)))
            else:
                h = self.matmul(z, "expert_down", f.expert_down.flatten(0, 1))
            up = f.up.permute(1, 0, 2).reshape(f.up.shape[1], -1)
            out = self.matmul(self.op(aten.mul.Tensor, h, spread), "up", up)
        self.call.replace_all_uses_with(out)
        self.graph.erase_node(self.call)

    @torch.no_grad()
    def run_lora(self) -> None:
        """A LoRA site kept out of the base weight (switchable export): ``(x @ Aᵀ) @ (s·B)ᵀ``."""
        lora = cast(LoRALayer, self.folded)
        with self.graph.inserting_before(self.call):
            out = self.matmul(self.matmul(self.x, "down", lora.A), "up", lora.B * lora.scale)
        self.call.replace_all_uses_with(out)
        self.graph.erase_node(self.call)

    def matmul(self, x: fx.Node, name: str, weight: torch.Tensor) -> fx.Node:
        """``x @ Wᵀ`` with ``Wᵀ`` stored as the buffer, so the ONNX initializer keeps
        its name (a ``linear`` weight is transposed and renamed by constant folding)."""
        return self.op(aten.matmul.default, x, self.weight(name, weight.T))

    def weight(self, name: str, tensor: torch.Tensor) -> fx.Node:
        return attach_buffer(self.gm, LOWERED_ATTR, f"{self.prefix}__{name}", tensor.to(self.dtype), self.fake_mode)

    def constant(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A fixed 0/1 matrix shared by every site of its shape (not an adapter tensor)."""
        if hasattr(getattr(self.gm, CONSTANTS_ATTR, None), name):
            return read_attr(self.gm, f"{CONSTANTS_ATTR}.{name}", self.fake_mode)
        return attach_buffer(self.gm, CONSTANTS_ATTR, name, tensor.to(self.dtype), self.fake_mode)

    def op(self, target, *args) -> fx.Node:
        return emit(self.graph, target, args, self.call, LowerRouting.name, self.fake_mode)


def _spread(num_experts: int, rank: int) -> torch.Tensor:
    """``[N, N·r]`` 0/1 matrix: ``g @ spread`` repeats each expert's gate over its r columns."""
    return torch.kron(torch.eye(num_experts), torch.ones(1, rank))


def _repeat(num_experts: int, rank: int) -> torch.Tensor:
    """``[r, N·r]`` 0/1 matrix: ``z @ repeat`` is z written once for each of the N experts."""
    return torch.eye(rank).repeat(1, num_experts)
