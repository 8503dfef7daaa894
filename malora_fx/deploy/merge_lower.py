"""merge / lower: the public entry points of the post-training passes.

Both return a new GraphModule by default and leave the caller's graph as it was
(adapters, trainable parameters, outputs); ``inplace=True`` rewrites the given
graph instead, for callers that own it. Either way the original model is never
modified: the passes write new tensors (folded weights, lowered buffers), so
the copy shares the frozen base weights with the caller's graph.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..passes import lower_pipeline, merge_pipeline, run_passes

# nn.Module state that GraphModule.__deepcopy__ drops: forward hooks (an exported graph checks its inputs in one,
# and capture's baked constants live in another)
_HOOK_ATTRS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
# attributes of torch.export's unlifted GraphModule that its constructor resets
_EXPORT_ATTRS = ("range_constraints", "validate_inputs")


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that the passes can rewrite without touching ``gm``.

    Graph, node and module meta, submodules (adapters included), trainable
    parameters and forward hooks are copied; frozen parameters and buffers
    (the base weights) are shared, since no pass writes into a tensor, and so
    are the routing statistics a forward left on adapter layers.
    """
    memo: dict[int, object] = {}
    for param in gm.parameters():
        if not param.requires_grad:
            memo[id(param)] = param
    for buf in gm.buffers():
        memo[id(buf)] = buf
    for module in gm.modules():  # tensors a forward left behind (routing statistics): not deep-copyable, not state
        for value in module.__dict__.values():
            for leaf in pytree.tree_leaves(value):
                if isinstance(leaf, torch.Tensor) and not leaf.is_leaf:
                    memo[id(leaf)] = leaf
    with warnings.catch_warnings():  # torch's own deepcopy of the graph's pytree specs warns about LeafSpec
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        new = copy.deepcopy(gm, memo)
    for attr in _HOOK_ATTRS:
        if attr in gm.__dict__:
            setattr(new, attr, copy.copy(gm.__dict__[attr]))
    for attr in _EXPORT_ATTRS:
        if attr in gm.__dict__:
            setattr(new, attr, gm.__dict__[attr])
    return new


def merge(gm: fx.GraphModule, *, inplace: bool = False) -> fx.GraphModule:
    """Fold trained adapters: LoRA into the base weights, scales (and MALoRA's
    ``P`` where cheaper) into the routed experts' up-projections.

    Args:
        gm: a transformed (or already merged) GraphModule.
        inplace: rewrite ``gm`` itself; by default a copy is merged and ``gm``
            keeps its trainable adapters (base weights are shared, not copied).

    Example:
        >>> merged = malora_fx.merge(gm)     # same outputs, fewer ops, no trainable adapters; gm unchanged
    """
    target = gm if inplace else copy_graph(gm)
    run_passes(target, merge_pipeline())
    return target


def lower(
    gm: fx.GraphModule, *, inplace: bool = False, fold_lora: bool = True, fuse: bool = False, join_up: bool = True
) -> fx.GraphModule:
    """Replace routed adapters by static ops (MatMul, Softmax, TopK, Scatter,
    Mul); merges first if needed. The result has no adapter modules and no
    data-dependent shapes, ready for ``torch.export`` / ONNX. With
    ``fold_lora=False`` LoRA sites stay separate matmuls instead of being folded
    into the base weights, so every adapter tensor remains its own buffer
    (``gm.malora_lowered``), overridable after export. ``fuse=True`` then
    concatenates the projections that read the same input as a lowered adapter
    — the routers and shared down-projections of q/k/v, of gate/up, of down —
    into one GEMM each (``passes/fuse_projections.py``), after each adapter's
    up-projection has joined its base projection's GEMM as ``[x, a] @ [Wᵀ ; U]``
    (``passes/join_up_projections.py``; ``join_up=False`` keeps them apart, and
    the base weights then join the fused GEMMs instead); groups without an
    adapter, and switchable adapter tensors, stay apart.

    ``inplace=True`` rewrites ``gm`` itself; by default a copy is lowered and
    ``gm`` is left as it was (base weights shared, not copied).

    Example:
        >>> lowered = malora_fx.lower(malora_fx.merge(gm), inplace=True, fuse=True)  # one copy, gm unchanged
    """
    target = gm if inplace else copy_graph(gm)
    run_passes(target, lower_pipeline(fold_lora, fuse, join_up))
    return target
