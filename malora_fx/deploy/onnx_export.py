"""ONNX export of a trained (merged, lowered) model, with a KV cache for decoders.

Decoder LMs are captured through :class:`DecoderWithCache`, whose flat
signature gives the ONNX graph these names::

    inputs   input_ids [b, s], attention_mask [b, past + s], position_ids [b, s],
             past_key_values.{i}.key / .value [b, kv_heads, past, head_dim]
    outputs  logits [b, s, vocab], present.{i}.key / .value [b, kv_heads, past + s, head_dim]

Encoders take ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` when
used) and return ``last_hidden_state`` (or ``logits``). The adapters go
through the same passes as in PyTorch (transform → load → merge → lower), so
the exported graph holds only plain ops; ``export.json`` records what a runner
needs (names, layer count, cache shapes, dtype, eos ids).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from ..adapters.files import config_from_file, load_adapters, read_adapter_config
from ..adapters.transform import transform
from ..errors import MaloraError
from ..fileio import atomic_directory
from ..graph.capture import count_parameters, output_head_names
from ..graph.sources import load_model
from ..passes import BASE_PARAMETERS_KEY, FUSED_ATTR, LOWERED_ATTR, OUTPUT_HEADS_KEY
from .merge_lower import lower, merge

logger = logging.getLogger(__name__)

EXPORT_JSON = "export.json"
EXPORT_FORMAT = "malora-fx-export/1"
MODEL_FILE = "model.onnx"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PREFIX = "lm."
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: larger models keep their tensors in model.onnx.data


class DecoderWithCache(nn.Module):
    """A causal LM with its KV cache as plain tensors in and out (``lm`` is the model)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache(list(past_key_values), config=self.lm.config)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        return out.logits, tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, head_dim


def decoder_example(config, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4) -> dict[str, Any]:
    layers, kv, head_dim = cache_geometry(config)
    empty = lambda: torch.randn(batch, kv, past, head_dim, dtype=dtype)  # noqa: E731
    return {
        "input_ids": torch.randint(0, min(int(config.vocab_size), 100), (batch, seq)),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
        "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        "past_key_values": tuple((empty(), empty()) for _ in range(layers)),
    }


def decoder_dynamic_shapes(example: dict[str, Any]) -> dict[str, Any]:
    auto = Dim.AUTO
    return {
        "input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}, "position_ids": {0: auto, 1: auto},
        "past_key_values": tuple(({0: auto, 2: auto}, {0: auto, 2: auto}) for _ in example["past_key_values"]),
    }


def decoder_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def capture_decoder(model: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Capture a causal LM with its KV cache; module names are those of ``model``."""
    wrapper = DecoderWithCache(model).eval()
    example = decoder_example(model.config, dtype)
    exported = torch.export.export(wrapper, (), example, dynamic_shapes=decoder_dynamic_shapes(example), strict=False)
    gm = exported.module()
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path[len(PREFIX):] if path.startswith(PREFIX) else path, cls) for key, (path, cls) in stack.items()
            }
    gm.meta[OUTPUT_HEADS_KEY] = output_head_names(model)
    gm.meta[BASE_PARAMETERS_KEY] = count_parameters(model)
    return gm, example


def is_decoder(model: nn.Module) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)()) and hasattr(model.config, "num_hidden_layers")


def export_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "fp32", opset: int = 18, cache: bool = True,
               base_only: bool = False, switchable: bool = False, lowered: bool = True, fuse: bool = True) -> Path:
    """Export RUN_DIR's base model with its trained adapters (merged and lowered) to ``out_dir``.

    Writes ``model.onnx`` (external data when over 2 GB), the tokenizer files
    and ``export.json``; the directory appears only when complete. With
    ``switchable`` the adapter tensors (LoRA kept out of the base weights) are
    graph inputs with initializers, so an ``.onnx_adapter`` file of another run
    of the same shape can replace them per request. ``lowered=False`` exports the
    merged graph as is (routed adapters traced through their module code), for
    comparison with the lowered form. ``fuse`` concatenates each adapter's
    router and shared down-projection with the base GEMMs reading the same
    input (:func:`malora_fx.lower`); base-only and switchable exports have
    nothing it fuses.
    """
    if dtype not in DTYPES:
        raise MaloraError(f"--dtype: {dtype!r}; allowed: {', '.join(DTYPES)}")
    if opset < 18:
        raise MaloraError(f"--opset: {opset} is too old; allowed: >= 18")
    info = read_adapter_config(run_dir)
    loaded = load_model(info["base_model"])
    model = loaded.model.to(DTYPES[dtype]).eval()
    decoder = cache and is_decoder(model)
    if decoder:
        gm, example = capture_decoder(model, DTYPES[dtype])
        dynamic = decoder_dynamic_shapes(example)
        input_names, output_names = decoder_names(cache_geometry(model.config)[0])
    else:
        gm, example, dynamic, input_names, output_names = _capture_plain(model)
    if not base_only:
        gm = _adapted(gm, run_dir, info, switchable, lowered, fuse)
    gm.to(DTYPES[dtype])
    out_dir = Path(out_dir)
    meta = {
        "format": EXPORT_FORMAT, "base_model": info["base_model"], "method": None if base_only else info["method"],
        "adapters": None if base_only else str(Path(run_dir).resolve()), "dtype": dtype, "opset": opset,
        "kind": "decoder" if decoder else ("causal-lm" if hasattr(model, "lm_head") else "encoder"),
        "inputs": input_names, "outputs": output_names, "kv_cache": decoder,
        "switchable": bool(switchable and not base_only), "fused": hasattr(gm, FUSED_ATTR),
        "adapter_parameters": adapter_parameters(gm) if switchable and not base_only else {},
    }
    if decoder:
        meta.update(decoder_meta(model.config))
    module = gm if decoder else _EncoderOutputs(gm, input_names, output_names)
    _write_export(module, gm, example, dynamic, output_names, opset, out_dir, meta, loaded.tokenizer)
    return out_dir


def decoder_meta(config) -> dict[str, int]:
    """The export.json entries a runner needs to build a decoder's KV cache."""
    layers, kv, head_dim = cache_geometry(config)
    return dict(num_layers=layers, num_kv_heads=kv, head_dim=head_dim, vocab_size=int(config.vocab_size),
                max_positions=int(getattr(config, "max_position_embeddings", 0) or 0))


def export_decoder_graph(gm: fx.GraphModule, example: dict[str, Any], config, out_dir: str | Path, *,
                         opset: int = 18, tokenizer=None, **meta) -> Path:
    """Export a decoder graph from :func:`capture_decoder` — adapted, merged,
    lowered or fused as the caller chose — with the KV-cache names of this
    module; ``meta`` entries override the export.json defaults.

    Example:
        >>> gm, example = capture_decoder(model)
        >>> export_decoder_graph(malora_fx.lower(gm, fuse=True), example, model.config, "exp", tokenizer=tok)
    """
    inputs, outputs = decoder_names(cache_geometry(config)[0])
    full = {"format": EXPORT_FORMAT, "base_model": None, "method": None, "adapters": None, "dtype": "fp32",
            "opset": opset, "kind": "decoder", "inputs": inputs, "outputs": outputs, "kv_cache": True,
            "switchable": False, "fused": hasattr(gm, FUSED_ATTR), "adapter_parameters": {}, **decoder_meta(config),
            **meta}
    _write_export(gm, gm, example, decoder_dynamic_shapes(example), outputs, opset, Path(out_dir), full, tokenizer)
    return Path(out_dir)


def _adapted(gm: fx.GraphModule, run_dir, info: dict, switchable: bool, lowered: bool = True,
             fuse: bool = True) -> fx.GraphModule:
    """transform → load the run's adapters → merge → lower (LoRA kept apart when switchable) → fuse."""
    gm = transform(gm, config_from_file(info))
    load_adapters(gm, run_dir)
    if switchable:
        return lower(gm, fold_lora=False, fuse=fuse)
    return lower(merge(gm), fuse=fuse) if lowered else merge(gm)


def export_onnx(gm: fx.GraphModule, out_dir: str | Path, example_kwargs: dict[str, Any], *, opset: int = 18,
                tokenizer=None, fuse: bool = True) -> Path:
    """Export a captured or transformed GraphModule to ``out_dir/model.onnx``.

    Adapters still in trainable form are merged and lowered first (``fuse``: as
    :func:`malora_fx.lower`). Inputs are
    named after ``example_kwargs`` (batch and sequence dynamic); outputs after
    the fields of the model output (``logits``, ``last_hidden_state``, ...).

    Example:
        >>> export_onnx(gm, "exports/gm", {"input_ids": ids, "attention_mask": mask})
    """
    if opset < 18:
        raise MaloraError(f"opset: {opset} is too old; allowed: >= 18")
    gm = lower(merge(gm), fuse=fuse)
    out = gm(**example_kwargs)
    names = list(out.keys()) if hasattr(out, "keys") else [f"output_{i}" for i in range(len(out))] \
        if isinstance(out, (tuple, list)) else ["output"]
    dynamic = {k: {0: Dim.AUTO, 1: Dim.AUTO} if v.dim() >= 2 else {0: Dim.AUTO} for k, v in example_kwargs.items()}
    meta = {"format": EXPORT_FORMAT, "base_model": None, "method": None, "lowered": True, "dtype": "fp32",
            "opset": opset, "kind": "graph", "inputs": list(example_kwargs), "outputs": names, "kv_cache": False,
            "switchable": False, "fused": hasattr(gm, FUSED_ATTR), "adapter_parameters": {}}
    _write_export(gm, gm, example_kwargs, dynamic, names, opset, Path(out_dir), meta, tokenizer)
    return Path(out_dir)


def adapter_parameters(gm: fx.GraphModule) -> dict[str, list[int]]:
    """``{onnx initializer name: shape}`` of the lowered adapter tensors."""
    container = getattr(gm, LOWERED_ATTR, None)
    if container is None:
        return {}
    return {f"{LOWERED_ATTR}.{name}": list(t.shape) for name, t in container.named_buffers()}


def export_adapter(run_dir: str | Path, out_file: str | Path, *, dtype: str = "fp32") -> Path:
    """Write RUN_DIR's adapters as an onnxruntime ``.onnx_adapter`` file for a switchable export."""
    import onnxruntime as ort

    info = read_adapter_config(run_dir)
    loaded = load_model(info["base_model"])
    model = loaded.model.to(DTYPES[dtype]).eval()
    gm = capture_decoder(model, DTYPES[dtype])[0] if is_decoder(model) else _capture_plain(model)[0]
    gm = _adapted(gm, run_dir, info, switchable=True)
    gm.to(DTYPES[dtype])
    params = {f"{LOWERED_ATTR}.{name}": ort.OrtValue.ortvalue_from_numpy(t.detach().cpu().numpy())
              for name, t in getattr(gm, LOWERED_ATTR).named_buffers()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    adapter.export_adapter(str(tmp))
    os.replace(tmp, out_file)
    return out_file


def make_initializers_overridable(path: Path, names: set[str]) -> None:
    """Declare the initializers ``names`` as graph inputs too (onnxruntime lets a run override them)."""
    import onnx

    model = onnx.load(str(path))
    present = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name in names and init.name not in present:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.save(model, str(path))


def _capture_plain(model: nn.Module):
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


def _write_export(module: nn.Module, gm: nn.Module, example, dynamic, output_names, opset, out_dir: Path, meta,
                  tokenizer) -> None:
    """Export ``module`` (``gm`` or a wrapper of it) into a temporary directory, check it, rename it to ``out_dir``."""
    import onnx

    input_names = meta["inputs"]
    for sub in module.modules():  # exported modules refuse .eval(); set the flag directly
        sub.training = False
    with atomic_directory(out_dir) as tmp:
        program = torch.onnx.export(module, (), kwargs=example, dynamic_shapes=dynamic, input_names=input_names,
                                    output_names=output_names, opset_version=opset, dynamo=True, verbose=False)
        size = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
        program.save(str(tmp / MODEL_FILE), external_data=size > EXTERNAL_DATA_BYTES)
        if meta["switchable"]:
            make_initializers_overridable(tmp / MODEL_FILE, set(meta["adapter_parameters"]))
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
