"""Stage 4 — deployment: merge and lower (``merge_lower``), ONNX export
(``onnx_export``, ``adapter_file``), the export manifest (``manifest``), the
onnxruntime runner (``runner``), latency benchmarks (``bench``) and PEFT
import (``peft_import``)."""
