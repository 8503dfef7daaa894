"""Which runtime serves an export: onnxruntime-genai (``genai``) or malora-fx's own onnxruntime runner (``ort``).

``auto`` (the default of ``malora-fx run`` and ``bench``) takes onnxruntime-genai when it can run the export
on CUDA (``onnxruntime-genai-cuda`` installed, ``provider`` not ``cpu``, the export an og model folder: a
decoder with a KV cache and ``genai_config.json``), and the ORT runner otherwise. On CPU the ORT runner is
measurably faster with these exports (SmolLM2-135M MALoRA, 2 cores: decode 40.7 vs 46.3 ms per token,
prefill of 128 tokens 300 vs 459 ms; og cannot share past and present buffers with this graph), and it is
the only one for encoders and graphs exported without a cache. ``--backend genai`` serves through og
anywhere. Both generators have the same ``generate`` (prompt ids in, token ids out; greedy gives the same
tokens).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MaloraError
from .genai_folder import GENAI_CONFIG
from .manifest import EXPORT_JSON, ExportManifest

BACKENDS = ("auto", "genai", "ort")


def choose_backend(backend: str, export_dir: str | Path, provider: str = "auto") -> str:
    """``genai`` or ``ort`` for ``auto`` / ``genai`` / ``ort``, this export and provider (see the module docstring)."""
    from .genai_runner import genai_available, import_genai

    if backend not in BACKENDS:
        raise MaloraError(f"backend: unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    directory = Path(export_dir)
    if provider == "cpu" or not genai_available() or not import_genai().is_cuda_available():
        return "ort"
    if not (directory / GENAI_CONFIG).is_file() or not (directory / EXPORT_JSON).is_file():
        return "ort"
    return "genai" if ExportManifest.read(directory).kv_cache else "ort"


def open_generator(
    export_dir: str | Path, backend: str = "auto", provider: str = "auto", io_binding: bool | None = None
):
    """An :class:`~malora_fx.deploy.genai_runner.GenaiGenerator` or :class:`~malora_fx.deploy.runner.OrtGenerator`.

    ``io_binding`` belongs to the ORT runner (onnxruntime-genai keeps its cache on the device itself).
    """
    chosen = choose_backend(backend, export_dir, provider)
    if chosen == "genai":
        if io_binding is not None:
            raise MaloraError(
                "--io-binding: applies to --backend ort only; onnxruntime-genai keeps its KV cache on the device itself"
            )
        from .genai_runner import GenaiGenerator

        return GenaiGenerator(export_dir, provider)
    from .runner import OrtGenerator

    return OrtGenerator(export_dir, provider, io_binding)


def describe(generator) -> str:
    """``onnxruntime-genai cpu`` / ``onnxruntime CPUExecutionProvider (IOBinding)``: what serves, for messages."""
    from .genai_runner import GenaiGenerator

    if isinstance(generator, GenaiGenerator):
        return f"onnxruntime-genai {generator.provider}"
    return f"onnxruntime {generator.provider}" + (" (IOBinding)" if generator.io_binding else "")
