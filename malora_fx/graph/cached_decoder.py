"""Capture of a causal LM together with its KV cache, as plain tensors in and out.

:func:`capture_decoder` wraps the model in :class:`DecoderWithCache`, whose
flat signature is (names as the ONNX export uses them, :func:`decoder_names`)::

    inputs   input_ids [b, s], attention_mask [b, past + s], position_ids [b, s],
             past_key_values.{i}.key / .value [b, kv_heads, past, head_dim]
    outputs  logits [b, s, vocab], present.{i}.key / .value [b, kv_heads, past + s, head_dim]

and captures it with ``torch.export`` (batch, sequence and past length
dynamic). The returned GraphModule keeps the module names of the model itself
(the wrapper's ``lm.`` prefix is stripped from ``nn_module_stack``), so the
adapter passes select the same sites as on a plain capture, and records the
output heads and base parameter count in ``gm.meta`` like
:func:`malora_fx.graph.capture.capture`. Nothing here writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from ..passes import BASE_PARAMETERS_KEY, OUTPUT_HEADS_KEY
from .capture import count_parameters, output_head_names

PREFIX = "lm."


class DecoderWithCache(nn.Module):
    """A causal LM with its KV cache as plain tensors in and out (``lm`` is the model)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.config: Any = lm.config

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache(list(past_key_values), config=self.config)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits, tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)


def is_decoder(model: nn.Module) -> bool:
    """Whether ``model`` generates text and has decoder layers (so it can be captured with a cache)."""
    return bool(getattr(model, "can_generate", lambda: False)()) and hasattr(model.config, "num_hidden_layers")


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, head_dim


def decoder_example(config, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4) -> dict[str, Any]:
    """Example inputs of :class:`DecoderWithCache` (a non-empty random past)."""
    layers, kv, head_dim = cache_geometry(config)
    empty = lambda: torch.randn(batch, kv, past, head_dim, dtype=dtype)  # noqa: E731
    return {
        "input_ids": torch.randint(0, min(int(config.vocab_size), 100), (batch, seq)),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
        "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        "past_key_values": tuple((empty(), empty()) for _ in range(layers)),
    }


def decoder_dynamic_shapes(example: dict[str, Any]) -> dict[str, Any]:
    """Batch and sequence of the token inputs, batch and past length of the cache: dynamic."""
    auto = Dim.AUTO
    return {
        "input_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "position_ids": {0: auto, 1: auto},
        "past_key_values": tuple(({0: auto, 2: auto}, {0: auto, 2: auto}) for _ in example["past_key_values"]),
    }


def decoder_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The flat input and output names of a decoder with ``num_layers`` cached layers."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def export_decoder_program(
    model: nn.Module, dtype: torch.dtype = torch.float32, *, gqa_sdpa: bool = False
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """``torch.export`` of :class:`DecoderWithCache` around ``model``, and its example inputs.

    :func:`capture_decoder` turns it into a GraphModule for the passes; an export with nothing to
    rewrite (base only) keeps it for ``torch.onnx.export`` should the direct translation decline, which
    saves tracing it again then.
    ``gqa_sdpa``: see :func:`sdpa_without_repeat_kv`.
    """
    wrapper = DecoderWithCache(model).eval()
    example = decoder_example(model.config, dtype)
    with sdpa_without_repeat_kv(gqa_sdpa):
        exported = torch.export.export(
            wrapper, (), example, dynamic_shapes=decoder_dynamic_shapes(example), strict=False
        )
    return exported, example


@contextlib.contextmanager
def sdpa_without_repeat_kv(enabled: bool = True) -> Iterator[None]:
    """While ``enabled``, transformers' SDPA attention passes grouped keys and values to
    ``scaled_dot_product_attention(enable_gqa=True)`` instead of repeating them first (its
    ``TRANSFORMERS_SDPA_FORCE_GQA`` switch; a transformers without it ignores it).

    Same attention, a third less capture time: tracing ``repeat_kv``'s reshape of an expanded tensor with
    symbolic shapes was ~5 of ~15 s for SmolLM2. The ONNX translation spells the grouped attention as the
    same repeat (so :mod:`~malora_fx.deploy.onnx_passes.gqa_attention` still fuses it). Only exports use
    it: PyTorch runs (training, the evaluation decoder) keep transformers' default.
    """
    if not enabled:
        yield
        return
    key, before = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def capture_decoder(
    model: nn.Module, dtype: torch.dtype = torch.float32, *, gqa_sdpa: bool = False
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Capture a causal LM with its KV cache; module names are those of ``model``.

    Returns the GraphModule and the example inputs it was captured with
    (:func:`decoder_example`), which an ONNX export reuses. ``gqa_sdpa``: see :func:`sdpa_without_repeat_kv`.
    """
    exported, example = export_decoder_program(model, dtype, gqa_sdpa=gqa_sdpa)
    gm = exported.module()
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path[len(PREFIX) :] if path.startswith(PREFIX) else path, cls)
                for key, (path, cls) in stack.items()
            }
    gm.meta[OUTPUT_HEADS_KEY] = output_head_names(model)
    gm.meta[BASE_PARAMETERS_KEY] = count_parameters(model)
    return gm, example
