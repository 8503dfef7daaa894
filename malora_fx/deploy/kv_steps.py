"""One generation's KV cache in onnxruntime: plain ``session.run`` with NumPy, or IOBinding on the device.

Both classes are callables ``(input_ids, attention_mask, position_ids) -> logits`` that keep the cache of one
generation between calls (``present.*`` of one step become ``past_key_values.*`` of the next):

* :class:`NumpyCache` — ``InferenceSession.run`` with NumPy arrays; the cache goes through host memory every
  step. An adapter is activated with ``RunOptions`` (``add_active_adapter``).
* :class:`BoundCache` — ``run_with_iobinding``: the present tensors stay where the execution provider put them
  (device memory on CUDA) and are bound as the next step's past, so the cache never leaves the device; only the
  token inputs go in and the logits come back to the host. onnxruntime ignores ``RunOptions`` adapters under
  IOBinding, so an adapter's tensors are bound as inputs instead (copied to the device once per file, by
  :class:`~malora_fx.deploy.runner.OrtGenerator`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import MaloraError, first_line

PAST, PRESENT = "past_key_values.", "present."


class NumpyCache:
    """The cache of one generation as NumPy arrays, fed with ``session.run`` (see the module docstring)."""

    def __init__(self, generator, batch: int, run_options=None) -> None:
        self.generator, self.run_options = generator, run_options
        self.past = generator.empty_past(batch)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        logits, self.past = self.generator.step(input_ids, attention_mask, position_ids, self.past, self.run_options)
        return logits


class BoundCache:
    """The cache of one generation kept on the session's device with IOBinding (see the module docstring).

    ``adapter_values`` maps adapter input names to ``OrtValue``s already on the device; they stay bound for
    the whole generation.
    """

    def __init__(self, generator, batch: int, adapter_values: Mapping[str, Any] | None = None) -> None:
        import onnxruntime as ort

        self.session = generator.session
        self.device = generator.device
        self.output_names: list[str] = generator.output_names
        self.binding = self.session.io_binding()
        for name, value in (adapter_values or {}).items():
            self.binding.bind_ortvalue_input(name, value)
        self._empty = generator.empty_past(batch)  # CPU OrtValues wrap these arrays without a copy
        self.past = {name: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for name, a in self._empty.items()}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        binding = self.binding
        for name, array in (
            ("input_ids", input_ids),
            ("attention_mask", attention_mask),
            ("position_ids", position_ids),
        ):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in self.past.items():
            binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        for name in self.output_names:
            binding.bind_output(name, "cpu" if name == "logits" else self.device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own types; surface them as one line
            raise MaloraError(f"onnxruntime failed: {first_line(exc)}") from None
        outputs = dict(zip(self.output_names, binding.get_outputs(), strict=True))
        self.past = {name.replace(PRESENT, PAST, 1): v for name, v in outputs.items() if name.startswith(PRESENT)}
        return outputs["logits"].numpy()
