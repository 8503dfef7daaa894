"""ONNX export of a trained (merged, lowered) model, with a KV cache for decoders.

Contract: every export directory holds ``model.onnx`` (its weights in
``model.onnx.data`` beside it), the tokenizer files when there is a
tokenizer, ``genai_config.json`` for decoders with a KV cache (so the folder
is an onnxruntime-genai model, :mod:`malora_fx.deploy.genai_folder`), and
``export.json`` (:class:`~malora_fx.deploy.manifest.ExportManifest`, built
once per export here); it appears only when complete, replacing an older one.
The ONNX model passes ``onnx.checker`` (full check).

* :func:`export_run` — a run directory's base model with its adapters (what
  ``malora-fx export`` does). Decoders are captured with their KV cache
  (:mod:`malora_fx.graph.cached_decoder`; input / output names there);
  encoders take ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` when
  used) and return ``last_hidden_state`` (or ``logits``).
* :func:`export_decoder_graph` — a decoder graph from ``capture_decoder``,
  with passes of the caller's choice.
* :func:`export_onnx` — any captured or transformed graph, no cache.

The adapters go through the same passes as in PyTorch (transform → load →
merge → lower), so the exported graph holds only plain ops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from ..adapters.run_dir import apply_run_adapters, read_run
from ..errors import MaloraError
from ..fileio import atomic_directory
from ..graph.cached_decoder import (
    cache_geometry,
    capture_decoder,
    decoder_dynamic_shapes,
    decoder_names,
    export_decoder_program,
    is_decoder,
)
from ..passes import FUSED_ATTR
from .adapter_file import adapter_parameters, make_initializers_overridable
from .genai_folder import write_genai_config
from .graph_to_onnx import translate_graph
from .manifest import ExportManifest, torch_dtype
from .merge_lower import lower, merge
from .onnx_passes import MAX_POSITIONS_KEY, optimize_onnx
from .onnx_passes.ort_fusions import register_checker_schemas
from .stage_clock import StageClock

logger = logging.getLogger(__name__)

# The weights (tensors over 1 KB) go to model.onnx.data beside it, as in onnxruntime-genai's builder folders:
# no protobuf size limit, and saving writes the tensors' bytes as they are (~0.8 s for SmolLM2 with MALoRA)
# instead of copying them into one message first (~4.5 s).
MODEL_FILE = "model.onnx"


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int = 18,
    cache: bool = True,
    base_only: bool = False,
    switchable: bool = False,
    lowered: bool = True,
    fuse: bool = True,
    ort_fusions: bool = True,
    moe_kernel: bool = False,
    direct: bool = True,
    clock: StageClock | None = None,
) -> Path:
    """Export RUN_DIR's base model with its trained adapters (merged and lowered) to ``out_dir``.

    Writes ``model.onnx`` (weights in ``model.onnx.data``), the tokenizer files
    and ``export.json``; the directory appears only when complete. With
    ``switchable`` the adapter tensors (LoRA kept out of the base weights) are
    graph inputs with initializers, so an ``.onnx_adapter`` file of another run
    of the same shape can replace them per request. ``lowered=False`` exports the
    merged graph as is (routed adapters traced through their module code), for
    comparison with the lowered form. ``fuse`` concatenates each adapter's
    router and shared down-projection with the base GEMMs reading the same
    input (:func:`malora_fx.lower`); base-only and switchable exports have
    nothing it fuses. ``ort_fusions`` maps attention to ``GroupQueryAttention`` (with a cache) or
    ``MultiHeadAttention`` (without), rotary to ``RotaryEmbedding``, and RMSNorm / LayerNorm and their
    residual adds to onnxruntime's fused norms (:mod:`~malora_fx.deploy.onnx_passes`); ``False``
    keeps standard ONNX ops for other runtimes. ``moe_kernel`` (with ``ort_fusions``) runs each routed
    adapter as one onnxruntime ``MoE`` node that computes only the top-k experts
    (:mod:`~malora_fx.deploy.onnx_passes.moe_routing`; off by default: slower on CPU). ``direct``
    translates the captured graph to ONNX as it is (:mod:`~malora_fx.deploy.graph_to_onnx`), with
    ``torch.onnx.export`` (two more traces) only where that declines; ``False`` always uses
    ``torch.onnx.export``. ``clock`` (a :class:`StageClock`) records each stage's seconds and says it as
    it ends: load, capture, adapters, translate (or torch.onnx), onnx passes, save.
    """
    dt = torch_dtype(dtype)
    if opset < 18:
        raise MaloraError(f"opset: {opset} is too old; allowed: >= 18")
    clock = clock or StageClock()
    with clock("load"):
        info, loaded = read_run(run_dir)
        model = loaded.model.to(dt).eval()
    decoder = bool(cache) and is_decoder(model)
    adapted = not base_only
    program = None  # a base-only decoder goes to torch.onnx as torch.export made it: nothing to rewrite
    with clock("capture"):
        if decoder:
            input_names, output_names = decoder_names(cache_geometry(model.config)[0])
        if decoder and not adapted:
            program, example = export_decoder_program(model, dt, gqa_sdpa=True)
            gm, dynamic = program.module(), None
        elif decoder:
            gm, example = capture_decoder(model, dt, gqa_sdpa=True)
            dynamic = decoder_dynamic_shapes(example)
        else:
            gm, example, dynamic, input_names, output_names = _capture_plain(model)
    switchable = bool(switchable) and adapted
    if adapted:
        with clock("adapters"):
            gm = apply_run_adapters(gm, run_dir, info)
            if switchable:
                gm = lower(gm, inplace=True, fold_lora=False, fuse=fuse)
            else:
                gm = merge(gm, inplace=True)
                # the MoE kernel pass matches the up-projections in their own MatMuls
                gm = lower(gm, inplace=True, fuse=fuse, join_up=not moe_kernel) if lowered else gm
    gm.to(dt)
    manifest = ExportManifest(
        base_model=info["base_model"],
        method=info["method"] if adapted else None,
        adapters=str(Path(run_dir).resolve()) if adapted else None,
        dtype=dtype,
        opset=opset,
        kind="decoder" if decoder else ("causal-lm" if hasattr(model, "lm_head") else "encoder"),
        inputs=input_names,
        outputs=output_names,
        kv_cache=decoder,
        switchable=switchable,
        fused=hasattr(gm, FUSED_ATTR),
        ort_fusions=ort_fusions,
        moe_kernel=bool(moe_kernel) and ort_fusions and adapted and not switchable,
        adapter_parameters=adapter_parameters(gm) if switchable else {},
        **(decoder_meta(model.config) if decoder else {}),
    )
    module = program or (gm if decoder else _EncoderOutputs(gm, input_names, output_names))
    out_dir = Path(out_dir)
    _write_export(module, gm, example, dynamic, manifest, out_dir, loaded.tokenizer, model.config, clock, direct)
    return out_dir


def decoder_meta(config) -> dict[str, Any]:
    """The export.json entries a runner needs to build a decoder's KV cache."""
    layers, kv, head_dim = cache_geometry(config)
    return dict(
        num_layers=layers,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
    )


def export_decoder_graph(
    gm: fx.GraphModule,
    example: dict[str, Any],
    config,
    out_dir: str | os.PathLike,
    *,
    opset: int = 18,
    tokenizer=None,
    **meta,
) -> Path:
    """Export a decoder graph from :func:`~malora_fx.graph.cached_decoder.capture_decoder` — adapted,
    merged, lowered or fused as the caller chose — with the KV-cache names of that module; ``meta``
    entries (fields of :class:`ExportManifest`) override the export.json defaults.

    Example:
        >>> gm, example = capture_decoder(model)
        >>> lowered = malora_fx.lower(gm, inplace=True, fuse=True)
        >>> export_decoder_graph(lowered, example, model.config, "exp", tokenizer=tok)
    """
    known = {f.name for f in dataclasses.fields(ExportManifest)}
    for key in meta:
        if key not in known:
            raise MaloraError(
                f"export_decoder_graph: {key!r} is not an export.json field; allowed: {', '.join(sorted(known))}"
            )
    inputs, outputs = decoder_names(cache_geometry(config)[0])
    manifest = ExportManifest(
        **{
            "opset": opset,
            "kind": "decoder",
            "inputs": inputs,
            "outputs": outputs,
            "kv_cache": True,
            "fused": hasattr(gm, FUSED_ATTR),
            "ort_fusions": True,
            **decoder_meta(config),
            **meta,
        }
    )
    _write_export(gm, gm, example, decoder_dynamic_shapes(example), manifest, Path(out_dir), tokenizer, config)
    return Path(out_dir)


def export_onnx(
    gm: fx.GraphModule,
    out_dir: str | os.PathLike,
    example_kwargs: dict[str, Any],
    *,
    opset: int = 18,
    tokenizer=None,
    fuse: bool = True,
    ort_fusions: bool = True,
) -> Path:
    """Export a captured or transformed GraphModule to ``out_dir/model.onnx``.

    A copy of ``gm`` is merged and lowered (``fuse``: as :func:`malora_fx.lower`)
    and exported; ``gm`` itself is left as it was (adapters, trainable
    parameters, outputs). Inputs are named after the tensors of
    ``example_kwargs`` (batch and sequence dynamic); constants baked into ``gm``
    at capture (``use_cache=False``) may be repeated there and are not ONNX
    inputs. Outputs are named after the fields of the model output
    (``logits``, ``last_hidden_state``, ...). ``ort_fusions`` as in :func:`export_run`.

    Example:
        >>> export_onnx(gm, "exports/gm", {"input_ids": ids, "attention_mask": mask})
    """
    from ..graph.capture import traceable_example
    from ..graph.constants import graph_kwargs

    if opset < 18:
        raise MaloraError(f"opset: {opset} is too old; allowed: >= 18")
    example = graph_kwargs(gm, example_kwargs)
    for key, value in example.items():
        if not isinstance(value, torch.Tensor):
            raise MaloraError(
                f'example_kwargs["{key}"]: a {type(value).__name__} is not a graph input; ONNX inputs are tensors '
                f"(constants such as use_cache=False are baked in at capture: pass them to capture)"
            )
    example = {k: traceable_example(v) for k, v in example.items()}  # contiguous; size-1 dims would be fixed
    gm = lower(merge(gm), inplace=True, fuse=fuse)  # merge copies: the caller's graph stays as it was
    out = gm(**example)
    names = (
        list(out.keys())
        if hasattr(out, "keys")
        else [f"output_{i}" for i in range(len(out))]
        if isinstance(out, (tuple, list))
        else ["output"]
    )
    dynamic = {k: {0: Dim.AUTO, 1: Dim.AUTO} if v.dim() >= 2 else {0: Dim.AUTO} for k, v in example.items()}
    manifest = ExportManifest(
        opset=opset,
        kind="graph",
        inputs=list(example),
        outputs=names,
        fused=hasattr(gm, FUSED_ATTR),
        ort_fusions=ort_fusions,
    )
    _write_export(gm, gm, example, dynamic, manifest, Path(out_dir), tokenizer)
    return Path(out_dir)


def _capture_plain(model: nn.Module):
    """(gm, example, dynamic shapes, input names, output names) of a model captured without a cache."""
    from ..graph.capture import capture, default_example_kwargs

    example = default_example_kwargs(model)
    gm = capture(model, example)
    dynamic = {k: {0: Dim.AUTO, 1: Dim.AUTO} for k in example}
    out = gm(**example)
    output_names = ["logits"] if hasattr(out, "logits") else ["last_hidden_state"]
    return gm, example, dynamic, list(example), output_names


class _EncoderOutputs(nn.Module):
    """Named token inputs in, the named output tensors of a ModelOutput out (encoders)."""

    def __init__(self, gm: nn.Module, input_names: list[str], output_names: list[str]) -> None:
        super().__init__()
        self.gm, self.input_names, self.output_names = gm, input_names, output_names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        out = self.gm(**{name: given[name] for name in self.input_names})
        return tuple(getattr(out, name) for name in self.output_names)


def _write_export(
    module: nn.Module | torch.export.ExportedProgram,
    gm: nn.Module,
    example,
    dynamic,
    manifest: ExportManifest,
    out_dir: Path,
    tokenizer,
    config=None,
    clock: StageClock | None = None,
    direct: bool = True,
) -> None:
    """Export ``module`` (``gm``, a wrapper of it, or the program ``gm`` came from) into a temporary directory,
    check it, rename it to ``out_dir``.

    ``gm`` goes to ONNX by :func:`~malora_fx.deploy.graph_to_onnx.translate_graph` (no second trace; stage
    "translate"); ``module`` goes through ``torch.onnx.export`` (stage "torch.onnx") when that declines or
    ``direct`` is False. ``torch.onnx.export`` runs without its own optimizer;
    :func:`~malora_fx.deploy.onnx_passes.optimize_onnx` cleans the graph instead (same result, a fraction of
    the time: see that module). A decoder with a KV cache (``config`` given) also gets its ``genai_config.json``.
    """
    clock = clock or StageClock()
    if isinstance(module, nn.Module):
        for sub in module.modules():  # exported modules refuse .eval(); set the flag directly
            sub.training = False
    with atomic_directory(out_dir) as tmp:
        program = None
        if isinstance(gm, fx.GraphModule) and direct:
            with clock("translate"):
                program = translate_graph(gm, list(manifest.inputs), list(manifest.outputs), manifest.opset)
        if program is None:
            with clock("torch.onnx"):
                program = _torch_onnx_export(module, example, dynamic, manifest)
        with clock("onnx passes"):
            if getattr(config, "max_position_embeddings", None):  # the rotary cache's length
                program.model.meta[MAX_POSITIONS_KEY] = int(config.max_position_embeddings)
            optimize_onnx(program.model, ort_fusions=manifest.ort_fusions, moe_kernel=manifest.moe_kernel)
            if manifest.moe_kernel and not program.model.meta.get("moe_routing"):
                manifest = dataclasses.replace(manifest, moe_kernel=False)  # no routed site matched
        with clock("save"):
            _save_checked(program, manifest, tmp, tokenizer, config)


def _torch_onnx_export(module, example, dynamic, manifest: ExportManifest):
    """``torch.onnx.export`` (dynamo) of ``module`` without its optimizer: traces it again."""
    program = torch.onnx.export(
        module,
        (),
        kwargs=example,
        dynamic_shapes=dynamic,
        input_names=list(manifest.inputs),
        output_names=list(manifest.outputs),
        opset_version=manifest.opset,
        dynamo=True,
        optimize=False,
        verbose=False,
    )
    if program is None:  # only when torch.onnx.export is given a file name
        raise MaloraError("torch.onnx.export returned no ONNX program")
    return program


def _save_checked(program, manifest: ExportManifest, tmp: Path, tokenizer, config) -> None:
    """Write the model (checked), tokenizer, genai_config.json and export.json into ``tmp``."""
    import onnx

    program.save(str(tmp / MODEL_FILE), external_data=True)  # the weights in model.onnx.data
    if manifest.switchable:
        make_initializers_overridable(tmp / MODEL_FILE, set(manifest.adapter_parameters))
    register_checker_schemas()  # onnxruntime's SimplifiedLayerNormalization, when ort_fusions made one
    onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if manifest.kv_cache and config is not None:
        write_genai_config(tmp, manifest, config, tokenizer, MODEL_FILE)
    manifest.write(tmp)
