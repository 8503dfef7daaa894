"""Map decomposed normalisation and rotary subgraphs to onnxruntime's fused contrib kernels.

Uses onnxscript's published fusion rules (``onnxscript.rewriter.ort_fusions``), each run on its
own rather than through ``optimize_for_ort`` (which first runs the default optimizer twice:
~50 s on SmolLM2-135M, against ~0.5 s for these rules on a graph :mod:`.cleanup` already
cleaned). What it matches and produces (domain ``com.microsoft``):

* ``x * rsqrt(mean(x²) + ε) * w`` → ``SimplifiedLayerNormalization`` (RMSNorm);
* a residual ``Add`` feeding such a norm → ``SkipSimplifiedLayerNormalization``;
* the same for LayerNorm → ``SkipLayerNormalization``.

Not fused here: attention (onnxscript's SDPA / GQA patterns do not match the exported attention
with its repeat-kv ``Expand`` and ``Where`` mask; :mod:`.gqa_attention` maps it to
``GroupQueryAttention`` instead) and rotary embeddings (onnxscript's rotary rule alone yields an
intermediate ``ai.onnxruntime._fusion`` function, not onnxruntime's ``RotaryEmbedding`` kernel; its
cos/sin-cache rule, which would, does not match our export).

``SimplifiedLayerNormalization`` lives in onnxruntime's registration of the default ONNX domain,
unknown to ``onnx.checker``: :func:`register_checker_schemas` declares it so the export's full
check still runs.

Numerics: the fused kernels compute the same formulas in another order; logits move by ~1e-5
relative in fp32 (tested against PyTorch). Graphs for runtimes without onnxruntime's contrib
ops are exported with ``--no-ort-fusions``.
"""

from __future__ import annotations

import functools
import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    fuse_skip_rms_normalization,
)

logger = logging.getLogger(__name__)

# In this order: a skip-norm rule matches the plain norm its own rule produced.
FUSIONS = (
    ("rms_normalization", fuse_rms_normalization),
    ("skip_rms_normalization", fuse_skip_rms_normalization),
    ("skip_layer_normalization", fuse_skip_layer_normalization),
)


def fuse_for_ort(model: ir.Model) -> ir.passes.PassResult:
    """Apply :data:`FUSIONS` in place; ``model.meta["ort_fusions"]`` holds the count of each."""
    counts = {name: int(fuse(model)) for name, fuse in FUSIONS}
    if any(counts.values()):
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedOpsetsPass()(model)
    model.meta["ort_fusions"] = counts
    logger.info("ort fusions: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return ir.passes.PassResult(model, any(counts.values()))


@functools.cache
def register_checker_schemas() -> None:
    """Declare onnxruntime's default-domain ``SimplifiedLayerNormalization`` to ``onnx.checker`` (once)."""
    if onnx.defs.has("SimplifiedLayerNormalization"):
        return
    schema = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    onnx.defs.register_schema(
        schema(
            "SimplifiedLayerNormalization",
            "",
            1,
            doc="onnxruntime's RMSNorm: Y = X / sqrt(mean(X^2, axis..) + epsilon) * scale",
            inputs=[schema.FormalParameter("X", "T"), schema.FormalParameter("scale", "V")],
            outputs=[
                schema.FormalParameter("Y", "V"),
                schema.FormalParameter("inv_std_var", "U", param_option=schema.FormalParameterOption.Optional),
            ],
            type_constraints=[("T", floats, ""), ("V", floats, ""), ("U", ["tensor(float)", "tensor(double)"], "")],
            attributes=[
                schema.Attribute("axis", schema.AttrType.INT, "", required=False),
                schema.Attribute("epsilon", schema.AttrType.FLOAT, "", required=False),
                schema.Attribute("stash_type", schema.AttrType.INT, "", required=False),
            ],
        )
    )
