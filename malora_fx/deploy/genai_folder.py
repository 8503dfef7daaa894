"""``genai_config.json``: every decoder export is also an onnxruntime-genai model folder.

Contract:

* :func:`genai_config` builds the JSON object onnxruntime-genai (``og``) needs
  to open an export directory with ``og.Model(dir)``: the model type
  (:func:`genai_model_type`, from the transformers ``model_type``), the
  decoder's dimensions, the graph's input and output names (those of
  :mod:`malora_fx.graph.cached_decoder`), the end-of-sequence ids
  (the tokenizer's eos and a chat template's end-of-turn marker, the same set
  ``malora-fx run`` stops on), bos / pad, the context length and greedy search
  defaults. ``past_present_share_buffer`` is false: the exported graph returns
  a present of length past + new tokens, not a preallocated buffer.
* :func:`write_genai_config` writes it into a directory being exported
  (the export's own atomic rename makes the folder appear complete).
* :func:`check_genai_folder` is what a runner calls before ``og.Model``: it
  names what is missing (``genai_config.json``, the model file) or why the
  export cannot be served by og (an encoder or a graph without a KV cache).

Only the keys og 0.18 accepts are written (it rejects unknown ones).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import MaloraError
from ..graph.cached_decoder import cache_geometry
from .manifest import EXPORT_JSON, ExportManifest

GENAI_CONFIG = "genai_config.json"

# transformers model_type -> onnxruntime-genai model.type, for the decoder-only families og 0.18 runs with
# this export's per-layer past / present names; any other decoder is declared "decoder" (og's generic
# decoder-only model). og's own "gpt2" type expects another cache layout (checked: "Model input was not
# found"), so GPT-2 exports are "decoder" too.
_OG_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
    "granite": "granite",
    "olmo": "olmo",
    "smollm3": "smollm3",
    "nemotron": "nemotron",
    "internlm2": "internlm2",
    "ernie4_5": "ernie4_5",
}
_DEFAULT_CONTEXT = 2048  # when the config names no maximum position


def genai_model_type(model_type: str | None) -> str:
    """onnxruntime-genai's ``model.type`` for a transformers ``model_type`` (``decoder`` when og has no own type)."""
    return _OG_TYPES.get(str(model_type), "decoder")


def genai_config(manifest: ExportManifest, config, tokenizer=None, model_file: str = "model.onnx") -> dict[str, Any]:
    """The ``genai_config.json`` object of a decoder export (see the module docstring)."""
    if not manifest.kv_cache:
        raise MaloraError(f"genai_config: a {manifest.kind} export without a KV cache cannot be an og model folder")
    layers, kv_heads, head_dim = cache_geometry(config)
    heads = int(config.num_attention_heads)
    eos = _eos_ids(config, tokenizer)
    bos = _first_int(getattr(tokenizer, "bos_token_id", None), getattr(config, "bos_token_id", None), eos[0])
    pad = _first_int(getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None), eos[0])
    context = int(manifest.max_positions or _DEFAULT_CONTEXT)
    return {
        "model": {
            "type": genai_model_type(getattr(config, "model_type", None)),
            "bos_token_id": bos,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": int(config.vocab_size),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": head_dim,
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(
    directory: str | os.PathLike, manifest: ExportManifest, config, tokenizer=None, model_file: str = "model.onnx"
) -> Path:
    """Write ``directory/genai_config.json`` for a decoder export; return its path."""
    path = Path(directory) / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(manifest, config, tokenizer, model_file), indent=2) + "\n")
    return path


def check_genai_folder(export_dir: str | os.PathLike) -> ExportManifest:
    """The manifest of an export og can open; a one-line MaloraError naming what is missing otherwise."""
    directory = Path(export_dir)
    if not directory.is_dir():
        raise MaloraError(f"{export_dir}: no such export directory")
    manifest = ExportManifest.read(directory) if (directory / EXPORT_JSON).is_file() else None
    if manifest is not None and not manifest.kv_cache:
        raise MaloraError(
            f"{export_dir}: a {manifest.kind} export without a KV cache cannot be served by onnxruntime-genai "
            "(it generates text with a decoder); use --backend ort"
        )
    config_path = directory / GENAI_CONFIG
    if not config_path.is_file():
        raise MaloraError(
            f"{export_dir}: no {GENAI_CONFIG}; export the run again with this malora-fx "
            "(every decoder export writes one) or use --backend ort"
        )
    try:
        config = json.loads(config_path.read_text())
        model_file = config["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MaloraError(f"{config_path}: not a genai_config (missing or unreadable {exc})") from None
    if not (directory / model_file).is_file():
        raise MaloraError(f"{export_dir}: {GENAI_CONFIG} names {model_file!r}, which is not there; export again")
    if manifest is None:
        raise MaloraError(f"{export_dir}: no {EXPORT_JSON} (not a malora-fx export directory)")
    return manifest


def _eos_ids(config, tokenizer) -> list[int]:
    """The stop ids, sorted: the tokenizer's (with a chat template's end-of-turn marker), else the config's."""
    if tokenizer is not None:
        from ..training.evaluate import stop_token_ids

        ids = sorted(stop_token_ids(tokenizer))
        if ids:
            return ids
    found = getattr(config, "eos_token_id", None)
    ids = [found] if isinstance(found, int) else list(found or [])
    if not ids:
        raise MaloraError("genai_config: the model names no end-of-sequence token (tokenizer or config eos_token_id)")
    return sorted(int(i) for i in ids)


def _first_int(*candidates) -> int:
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (list, tuple)) and value:
            return int(value[0])
    raise MaloraError("genai_config: no token id found")  # unreachable: the eos fallback is always an int
