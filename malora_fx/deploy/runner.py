"""Run an exported model in onnxruntime: KV-cache generation, adapter switching.

``OrtGenerator(export_dir)`` opens ``model.onnx`` with the CUDA execution
provider when available (``provider="auto"``), else the CPU one, and says
which. ``generate`` prefills the prompt once, then feeds one token at a time
with the cache (``present.*`` → ``past_key_values.*``). Sampling: greedy at
temperature 0, otherwise temperature + top-p with a seeded NumPy generator.
``adapter=`` activates an ``.onnx_adapter`` file for the run
(``RunOptions.add_active_adapter``). With ``io_binding`` (the default on
CUDA) the KV cache stays on the device between steps and an adapter's tensors
are bound as inputs instead (:mod:`malora_fx.deploy.kv_steps`). What the export holds comes from its
``export.json`` (:class:`~malora_fx.deploy.manifest.ExportManifest`,
:func:`read_export`).

One ``OrtGenerator`` serves many threads at once: ``InferenceSession.run`` is
thread-safe, every ``generate`` call keeps its own cache, sampler and
``RunOptions``, and each adapter file is loaded once (under a lock) into a
``LoraAdapter`` that stays alive as long as the generator, so concurrent
requests with different adapters never share or free each other's state.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MaloraError, first_line
from .adapter_file import adapter_file_key, check_adapter_file
from .kv_steps import BoundCache, NumpyCache
from .manifest import EXPORT_JSON, ExportManifest

PROVIDERS = ("auto", "cuda", "cpu")
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def choose_provider(provider: str) -> str:
    """The onnxruntime execution provider for ``auto`` / ``cuda`` / ``cpu``."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise MaloraError(f"provider: unknown provider {provider!r}; allowed: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise MaloraError(
            "provider: 'cuda' is not available: onnxruntime has no CUDA execution provider here "
            "(install onnxruntime-gpu instead of onnxruntime)"
        )
    if provider == "cpu" or "CUDAExecutionProvider" not in available:
        return "CPUExecutionProvider"
    return "CUDAExecutionProvider"


def read_export(export_dir: str | Path) -> ExportManifest:
    """The manifest of an export directory; fails unless it holds ``model.onnx`` and ``export.json``."""
    directory = Path(export_dir)
    if not (directory / "model.onnx").is_file() or not (directory / EXPORT_JSON).is_file():
        raise MaloraError(f"{export_dir}: no model.onnx / export.json (not a malora-fx export directory)")
    return ExportManifest.read(directory)


class OrtGenerator:
    """An onnxruntime session over an exported decoder with its tokenizer."""

    def __init__(self, export_dir: str | Path, provider: str = "auto", io_binding: bool | None = None) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.dir = Path(export_dir)
        self.manifest = read_export(self.dir)
        self.provider = choose_provider(provider)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # overridable adapter initializers are intended; keep ORT quiet about them
        model_file = self.dir / "model.onnx"
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=[self.provider])
        except Exception as exc:  # onnxruntime raises its own types for a damaged or foreign file
            raise MaloraError(f"{model_file}: onnxruntime cannot load it ({first_line(exc)})") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        self.dtype = _NP_DTYPES[self.manifest.dtype]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        # IOBinding keeps the KV cache on the device; by default where there is one to keep it on
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        self._bound_adapters: dict[tuple[str, int, int], dict[str, Any]] = {}  # OrtValues on self.device
        self._bound_arrays: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}  # what CPU OrtValues wrap
        # one LoraAdapter per adapter file version, never dropped: a RunOptions does not keep its adapter alive
        self._loaded_adapters: dict[tuple[str, int, int], Any] = {}
        self._adapters_lock = threading.Lock()

    @property
    def is_decoder(self) -> bool:
        return self.manifest.kv_cache

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        _, kv_heads, head_dim = self.manifest.cache_geometry()
        shape = (batch, kv_heads, 0, head_dim)
        return {
            name: np.zeros(shape, self.dtype) for name in self.manifest.inputs if name.startswith("past_key_values.")
        }

    def run_options(self, adapter: str | Path | None):
        import onnxruntime as ort

        if adapter is None:
            return None
        path = Path(adapter)
        options = ort.RunOptions()
        try:
            lora = self._adapter(path)
            options.add_active_adapter(lora)
        except MaloraError:
            raise
        except Exception as exc:
            raise MaloraError(f"adapter: {adapter} cannot be used with this export: {exc}") from None
        return options

    def adapter_values(self, adapter: str | Path | None) -> dict[str, Any]:
        """The adapter file's tensors as ``OrtValue``s on this session's device, for IOBinding (loaded once)."""
        import onnxruntime as ort

        if adapter is None:
            return {}
        key = adapter_file_key(adapter)
        path = Path(adapter)
        with self._adapters_lock:
            values = self._bound_adapters.get(key)
            if values is None:
                self.check_adapter(path)
                params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
                # on the CPU an OrtValue wraps the array without a copy: keep the arrays alive with it
                arrays = {name: np.array(value.numpy(), copy=True) for name, value in params.items()}
                values = {name: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for name, a in arrays.items()}
                self._bound_arrays[key] = arrays
                self._bound_adapters[key] = values
            return values

    def new_cache(self, batch: int, adapter: str | Path | None = None):
        """A fresh KV cache for one generation: ``(ids, mask, positions) -> logits`` (:mod:`.kv_steps`)."""
        if self.io_binding:
            return BoundCache(self, batch, self.adapter_values(adapter))
        return NumpyCache(self, batch, self.run_options(adapter))

    def _adapter(self, path: Path):
        """The ``LoraAdapter`` of ``path``: checked and loaded once per file version, shared by all threads."""
        import onnxruntime as ort

        key = adapter_file_key(path)
        with self._adapters_lock:
            lora = self._loaded_adapters.get(key)
            if lora is None:
                self.check_adapter(path)
                lora = ort.LoraAdapter()
                lora.Load(str(path))
                self._loaded_adapters[key] = lora
            return lora

    def check_adapter(self, path: Path) -> None:
        """Fail unless every tensor of the adapter file is an overridable input of this export."""
        check_adapter_file(self.manifest, path, self.dir)

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: dict[str, np.ndarray],
        options=None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: logits and the next past (``present.*`` renamed)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **past}
        try:
            outputs = self.session.run(None, feeds, options)
        except Exception as exc:  # onnxruntime raises its own types; surface them as one line
            raise MaloraError(f"onnxruntime failed: {str(exc).splitlines()[0]}") from None
        result = dict(zip(self.output_names, outputs, strict=True))
        new_past = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in result.items()
            if name.startswith("present.")
        }
        return result["logits"], new_past

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: set[int] | None = None,
        adapter: str | Path | None = None,
        seed: int = 0,
    ) -> Generator[int, None, int | None]:
        """Yield generated token ids one by one (stop tokens are not yielded).

        The generator's return value (``StopIteration.value``) is the stop id that ended it, or ``None``
        when ``max_new_tokens`` ran out. Safe to call from many threads on one generator.
        """
        if not self.is_decoder:
            raise MaloraError(f"{self.dir}: generation needs a decoder export with a KV cache")
        check_generation_request(self.manifest, len(prompt_ids), max_new_tokens, temperature, top_p)
        cache = self.new_cache(1, adapter)
        rng = np.random.default_rng(seed)
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        length = 0
        for _ in range(max_new_tokens):
            step_len = ids.shape[1]
            mask = np.ones((1, length + step_len), dtype=np.int64)
            positions = np.arange(length, length + step_len, dtype=np.int64)[None, :]
            logits = cache(ids, mask, positions)
            length += step_len
            token = sample(logits[0, -1].astype(np.float64), temperature, top_p, rng)
            if stop_ids and token in stop_ids:
                return token
            yield token
            ids = np.asarray([[token]], dtype=np.int64)
        return None


def check_generation_request(
    manifest: ExportManifest, prompt_length: int, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """One-line MaloraErrors for a generation request either runner refuses (limits, sampling settings)."""
    if max_new_tokens < 0:
        raise MaloraError(f"max_new_tokens: {max_new_tokens} is not allowed; expected an integer >= 0")
    limit = manifest.max_positions or 0
    if limit and prompt_length + max_new_tokens > limit:
        raise MaloraError(
            f"prompt of {prompt_length} tokens + {max_new_tokens} new tokens exceeds the "
            f"model's context of {limit} positions"
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise MaloraError(f"temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else softmax(logits / T) restricted to the top-p nucleus."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
    kept = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=kept))
