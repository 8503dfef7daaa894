"""Generate with an export through onnxruntime-genai (``og``), behind the same interface as the ORT runner.

``GenaiGenerator(export_dir, provider="auto")`` opens the export folder as an
og model (:mod:`malora_fx.deploy.genai_folder` wrote its ``genai_config.json``)
on the CUDA provider when og has one (``onnxruntime-genai-cuda``) and
``provider`` allows it, else on the CPU. Its :meth:`~GenaiGenerator.generate`
has the signature of :meth:`malora_fx.deploy.runner.OrtGenerator.generate`:
prompt ids in, token ids yielded one by one, the stop id that ended it as the
return value. Greedy decoding gives the same tokens as the ORT runner;
sampling uses og's own random generator (seeded), so sampled text differs
between the two backends.

``adapter=`` activates an ``.onnx_adapter`` file for one generation
(``og.Adapters`` + ``Generator.set_active_adapter``). Each file is checked
against ``export.json`` and loaded once (under a lock) into the model's
``og.Adapters``; several can be loaded and different generations (threads) may
use different ones. A batch cannot mix adapters (og's rule); this runner
generates one sequence per call.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from ..errors import MaloraError, first_line
from .adapter_file import adapter_file_key, check_adapter_file
from .genai_folder import check_genai_folder
from .runner import PROVIDERS, check_generation_request

GENAI_EXTRA = (
    "onnxruntime-genai is not installed; install the genai extra: pip install -e '.[genai]' "
    "(onnxruntime-genai-cuda on GPU machines, never both), or use --backend ort"
)


def import_genai():
    """The ``onnxruntime_genai`` module; a one-line MaloraError naming the extra when it is missing."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MaloraError(GENAI_EXTRA) from None
    return og


def genai_available() -> bool:
    """Whether onnxruntime-genai can be imported here."""
    try:
        import_genai()
    except MaloraError:
        return False
    return True


def genai_provider(og, provider: str) -> str:
    """og's provider name (``cuda`` / ``cpu``) for ``auto`` / ``cuda`` / ``cpu``."""
    if provider not in PROVIDERS:
        raise MaloraError(f"provider: unknown provider {provider!r}; allowed: {', '.join(PROVIDERS)}")
    cuda = bool(og.is_cuda_available())
    if provider == "cuda" and not cuda:
        raise MaloraError(
            "provider: 'cuda' is not available: onnxruntime-genai has no CUDA support here "
            "(install onnxruntime-genai-cuda instead of onnxruntime-genai)"
        )
    return "cuda" if provider != "cpu" and cuda else "cpu"


class GenaiGenerator:
    """An onnxruntime-genai model over an export folder, with the export's tokenizer (transformers)."""

    def __init__(self, export_dir: str | Path, provider: str = "auto") -> None:
        from transformers import AutoTokenizer

        og = import_genai()
        self.og = og
        self.dir = Path(export_dir)
        self.manifest = check_genai_folder(self.dir)
        self.provider = genai_provider(og, provider)
        try:
            config = og.Config(str(self.dir))
            config.clear_providers()
            if self.provider == "cuda":
                config.append_provider("cuda")
            self.model = og.Model(config)
        except Exception as exc:  # og raises its own types for a damaged folder or model file
            model_file = self.dir / "model.onnx"
            raise MaloraError(f"{model_file}: onnxruntime-genai cannot load it ({first_line(exc)})") from None
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        self._adapters: Any = None  # og.Adapters of this model, made on first use
        self._adapter_names: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    @property
    def is_decoder(self) -> bool:
        return self.manifest.kv_cache

    def _adapter_name(self, path: Path) -> str:
        """The og name of the adapter file ``path``: checked and loaded once per file version."""
        key = adapter_file_key(path)
        with self._lock:
            name = self._adapter_names.get(key)
            if name is None:
                check_adapter_file(self.manifest, path, self.dir)
                if self._adapters is None:
                    self._adapters = self.og.Adapters(self.model)
                name = f"adapter{len(self._adapter_names)}"
                try:
                    self._adapters.load(str(path), name)
                except Exception as exc:
                    raise MaloraError(f"adapter: {path} cannot be used with this export: {first_line(exc)}") from None
                self._adapter_names[key] = name
            return name

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
        """Yield generated token ids (stop tokens are not yielded); return the stop id, or ``None`` at the limit.

        og also stops at the eos ids of ``genai_config.json`` (the same set by default).
        """
        check_generation_request(self.manifest, len(prompt_ids), max_new_tokens, temperature, top_p)
        if not prompt_ids:
            raise MaloraError("prompt: empty; give at least one token")
        name = self._adapter_name(Path(adapter)) if adapter is not None else None
        if max_new_tokens == 0:
            return None
        generator = self.new_generator(len(prompt_ids) + max_new_tokens, temperature, top_p, seed)
        if name is not None:
            generator.set_active_adapter(self._adapters, name)
        generator.append_tokens(list(prompt_ids))
        for _ in range(max_new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if stop_ids and token in stop_ids:
                return token
            yield token
        return None

    def new_generator(self, max_length: int, temperature: float, top_p: float, seed: int, min_length: int = 0):
        """An ``og.Generator`` with these search options (greedy at temperature 0)."""
        params = self.og.GeneratorParams(self.model)
        options: dict[str, object] = {"max_length": max_length, "min_length": min_length}
        if temperature > 0:
            options.update(
                do_sample=True, temperature=temperature, top_p=top_p, top_k=self.manifest.vocab_size, random_seed=seed
            )
        else:
            options.update(do_sample=False, top_k=1)
        params.set_search_options(**options)
        return self.og.Generator(self.model, params)
