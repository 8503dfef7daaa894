"""merge / lower: the public entry points of the post-training passes.

Both rewrite the GraphModule in place and return it; the caller's original
model is never modified (folded weights are new tensors).
"""

from __future__ import annotations

from torch import fx

from ..passes import lower_pipeline, merge_pipeline, run_passes


def merge(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold trained adapters: LoRA into the base weights, scales (and MALoRA's
    ``P`` where cheaper) into the routed experts' up-projections.

    Example:
        >>> gm = malora_fx.merge(gm)     # same outputs, fewer ops, no trainable adapters
    """
    run_passes(gm, merge_pipeline())
    return gm


def lower(gm: fx.GraphModule, *, fold_lora: bool = True, fuse: bool = False) -> fx.GraphModule:
    """Replace routed adapters by static ops (MatMul, Softmax, TopK, Scatter,
    Mul); merges first if needed. The result has no adapter modules and no
    data-dependent shapes, ready for ``torch.export`` / ONNX. With
    ``fold_lora=False`` LoRA sites stay separate matmuls instead of being folded
    into the base weights, so every adapter tensor remains its own buffer
    (``gm.malora_lowered``), overridable after export. ``fuse=True`` then
    concatenates the projections that read the same input as a lowered adapter
    — the base weights, routers and shared down-projections of q/k/v, of
    gate/up, of down — into one GEMM each (``passes/fuse_projections.py``);
    groups without an adapter, and switchable adapter tensors, stay apart.

    Example:
        >>> gm = malora_fx.lower(malora_fx.merge(gm), fuse=True)
    """
    run_passes(gm, lower_pipeline(fold_lora, fuse))
    return gm
