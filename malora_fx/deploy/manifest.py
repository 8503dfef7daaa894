"""``export.json``: the manifest of an export directory, as one typed, versioned record.

Contract:

* :class:`ExportManifest` is the only writer (:meth:`~ExportManifest.write`,
  crash-safe) and the only reader (:meth:`~ExportManifest.read`) of
  ``export.json``; code elsewhere uses its attributes, never string keys.
* On disk the keys are, in this order: ``format``, ``base_model``, ``method``,
  ``adapters``, ``dtype``, ``opset``, ``kind``, ``inputs``, ``outputs``,
  ``kv_cache``, ``switchable``, ``fused``, ``ort_fusions``, ``adapter_parameters`` and, for
  decoders with a KV cache only, ``num_layers``, ``num_kv_heads``,
  ``head_dim``, ``vocab_size``, ``max_positions``.
* ``format`` is the version marker, :data:`EXPORT_FORMAT`. Reading refuses a
  newer or unknown format (naming the one found and the one supported), a key
  this version does not know (naming it), a missing required key, or a value
  of the wrong type, always with a :class:`~malora_fx.errors.MaloraError`.
  ``lowered``, which ``export_onnx`` wrote in format 1 before the manifest had
  one writer (always ``true``), is accepted and dropped.
* ``adapters`` is informational: the absolute path of the run directory the
  adapters came from, at export time (``None`` for base-only and graph
  exports). The export itself is self-contained and nothing reads this path
  back, so an export folder copied to another machine works the same;
  ``malora-fx bench`` takes the run directory explicitly (``--run``) and only
  quotes this value in its error when ``--run`` is missing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import MaloraError
from ..fileio import atomic_write

EXPORT_JSON = "export.json"
EXPORT_FORMAT = "malora-fx-export/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # export.json "dtype" -> torch dtype
KINDS = ("decoder", "causal-lm", "encoder", "graph")
DECODER_KEYS = ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_positions")
_REQUIRED = ("format", "kind", "inputs", "outputs")
_LEGACY_KEYS = frozenset({"lowered"})  # written by format-1 export_onnx; carried no information (always true)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an export dtype name (``fp32`` / ``fp16``)."""
    if name not in DTYPES:
        raise MaloraError(f"dtype: {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True, kw_only=True)
class ExportManifest:
    """What a runner needs to know about an export directory (see the module docstring).

    Lists become tuples (``inputs``, ``outputs``, adapter shapes), so equal
    manifests compare equal however they were built.
    """

    format: str = EXPORT_FORMAT
    base_model: str | None = None
    method: str | None = None
    adapters: str | None = None  # informational: the run directory at export time (see module docstring)
    dtype: str = "fp32"
    opset: int = 18
    kind: str
    inputs: Sequence[str]  # stored as a tuple
    outputs: Sequence[str]  # stored as a tuple
    kv_cache: bool = False
    switchable: bool = False
    fused: bool = False
    ort_fusions: bool = False  # onnxruntime contrib ops (GroupQueryAttention, RotaryEmbedding, norms) in the graph
    moe_kernel: bool = False  # routed adapters run as com.microsoft.MoE nodes (export --moe-kernel)
    adapter_parameters: Mapping[str, Sequence[int]] = field(default_factory=dict)  # shapes stored as tuples
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    max_positions: int | None = None

    def __post_init__(self) -> None:
        _check_format(self.format, EXPORT_JSON)
        for name in ("base_model", "method", "adapters"):
            _expect(name, getattr(self, name), lambda v: v is None or isinstance(v, str), "a string or null")
        _expect("dtype", self.dtype, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
        _expect("opset", self.opset, _is_int, "an integer")
        _expect("kind", self.kind, lambda v: v in KINDS, f"one of {', '.join(KINDS)}")
        for name in ("inputs", "outputs"):
            value = getattr(self, name)
            _expect(
                name,
                value,
                lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v),
                "a list of names",
            )
            object.__setattr__(self, name, tuple(value))
        for name in ("kv_cache", "switchable", "fused", "ort_fusions", "moe_kernel"):
            _expect(name, getattr(self, name), lambda v: isinstance(v, bool), "true or false")
        _expect(
            "adapter_parameters",
            self.adapter_parameters,
            lambda v: (
                isinstance(v, Mapping)
                and all(
                    isinstance(k, str) and isinstance(s, (list, tuple)) and all(_is_int(d) for d in s)
                    for k, s in v.items()
                )
            ),
            "a mapping of names to shapes",
        )
        object.__setattr__(self, "adapter_parameters", {k: tuple(s) for k, s in self.adapter_parameters.items()})
        for name in DECODER_KEYS:
            value = getattr(self, name)
            _expect(name, value, lambda v: v is None or _is_int(v), "an integer or null")
            if self.kv_cache and value is None:
                raise MaloraError(f"{EXPORT_JSON}: a KV-cache export needs {name!r}")

    def cache_geometry(self) -> tuple[int, int, int]:
        """``(layers, kv heads, head dim)`` of a KV-cache export; MaloraError for any other."""
        if self.num_layers is None or self.num_kv_heads is None or self.head_dim is None:
            raise MaloraError(f"{EXPORT_JSON}: this {self.kind} export has no KV cache")
        return self.num_layers, self.num_kv_heads, self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in file order; decoder keys only when set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in DECODER_KEYS and value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif f.name == "adapter_parameters":
                value = {k: list(s) for k, s in value.items()}
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> ExportManifest:
        """Parse manifest JSON: a ``str`` is the JSON text, a path-like is a file to read."""
        where = EXPORT_JSON
        if isinstance(text_or_path, os.PathLike):
            where = str(text_or_path)
            try:
                text = Path(text_or_path).read_text()
            except OSError as exc:
                raise MaloraError(f"{where}: cannot read ({exc.strerror})") from None
        else:
            text = text_or_path
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MaloraError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MaloraError(f"{where}: expected a JSON object, found {type(data).__name__}")
        _check_format(data.get("format"), where)
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known and key not in _LEGACY_KEYS:
                raise MaloraError(f"{where}: unknown key {key!r} (format {EXPORT_FORMAT!r} does not have it)")
        for key in _REQUIRED:
            if key not in data:
                raise MaloraError(f"{where}: missing key {key!r}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except MaloraError as exc:
            raise MaloraError(str(exc).replace(EXPORT_JSON, where, 1)) from None

    def write(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/export.json`` atomically; return its path."""
        path = Path(directory) / EXPORT_JSON
        text = self.to_json()
        atomic_write(path, lambda tmp: tmp.write_text(text))
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ExportManifest:
        """Read ``directory/export.json``."""
        path = Path(directory) / EXPORT_JSON
        if not path.is_file():
            raise MaloraError(f"{directory}: no {EXPORT_JSON}")
        return cls.from_json(path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(name: str, value: Any, ok, what: str) -> None:
    if not ok(value):
        raise MaloraError(f"{EXPORT_JSON}: {name!r} is {value!r}; expected {what}")


def _check_format(found: Any, where: str) -> None:
    if found == EXPORT_FORMAT:
        return
    if found is None:
        raise MaloraError(f"{where}: no 'format' key; supported: {EXPORT_FORMAT!r}")
    match = re.fullmatch(r"malora-fx-export/(\d+)", str(found))
    if match and int(match.group(1)) > int(EXPORT_FORMAT.rsplit("/", 1)[1]):
        raise MaloraError(
            f"{where}: format {found!r} is newer than this malora-fx supports ({EXPORT_FORMAT!r}); "
            "upgrade malora-fx or export again with this version"
        )
    raise MaloraError(f"{where}: format {found!r} is not supported; supported: {EXPORT_FORMAT!r}")
