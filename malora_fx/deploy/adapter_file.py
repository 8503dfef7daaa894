"""onnxruntime ``.onnx_adapter`` files: a run's adapter tensors for a switchable export.

A switchable export (``export_run(..., switchable=True)``) keeps every lowered
adapter tensor as its own initializer named ``malora_lowered.<buffer>`` and
also declares it a graph input (:func:`make_initializers_overridable`), so
onnxruntime lets a run override it. :func:`adapter_parameters` lists those
names with their shapes (recorded in ``export.json``). :func:`export_adapter`
writes another run's tensors under the same names, in onnxruntime's adapter
format, atomically; the runner checks a file against ``export.json`` before
activating it.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import fx

from ..adapters.run_dir import apply_run_adapters, read_run
from ..errors import MaloraError, first_line
from ..fileio import atomic_write
from ..graph.cached_decoder import capture_decoder, is_decoder
from ..graph.capture import capture, default_example_kwargs
from ..passes import LOWERED_ATTR
from .manifest import ExportManifest, torch_dtype
from .merge_lower import lower


def adapter_parameters(gm: fx.GraphModule) -> dict[str, list[int]]:
    """``{onnx initializer name: shape}`` of the lowered adapter tensors."""
    container = getattr(gm, LOWERED_ATTR, None)
    if container is None:
        return {}
    return {f"{LOWERED_ATTR}.{name}": list(t.shape) for name, t in container.named_buffers()}


def export_adapter(run_dir: str | os.PathLike, out_file: str | os.PathLike, *, dtype: str = "fp32") -> Path:
    """Write RUN_DIR's adapters as an onnxruntime ``.onnx_adapter`` file for a switchable export."""
    import onnxruntime as ort

    dt = torch_dtype(dtype)
    info, loaded = read_run(run_dir)
    model = loaded.model.to(dt).eval()
    gm = (
        capture_decoder(model, dt, gqa_sdpa=True)[0]
        if is_decoder(model)
        else capture(model, default_example_kwargs(model))
    )
    gm = lower(apply_run_adapters(gm, run_dir, info), inplace=True, fold_lora=False, fuse=True)
    gm.to(dt)
    params = {
        f"{LOWERED_ATTR}.{name}": ort.OrtValue.ortvalue_from_numpy(t.detach().cpu().numpy())
        for name, t in getattr(gm, LOWERED_ATTR).named_buffers()
    }
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_file, lambda tmp: adapter.export_adapter(str(tmp)))
    return out_file


def make_initializers_overridable(path: Path, names: set[str]) -> None:
    """Declare the initializers ``names`` as graph inputs too (onnxruntime lets a run override them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the graph only: the weights file stays as it is
    present = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name in names and init.name not in present:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.save(model, str(path))


def check_adapter_file(manifest: ExportManifest, path: str | os.PathLike, export_dir: str | os.PathLike) -> None:
    """Fail (one line) unless the ``.onnx_adapter`` file holds exactly the adapter tensors of this
    switchable export, with their shapes (``export.json``'s ``adapter_parameters``)."""
    import onnxruntime as ort

    expected = {name: list(shape) for name, shape in manifest.adapter_parameters.items()}
    if not expected:
        raise MaloraError(
            f"adapter: {export_dir} is not a switchable export (switchable=True); adapters cannot be swapped"
        )
    if not Path(path).is_file():
        raise MaloraError(f"adapter: {path} does not exist")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as exc:
        raise MaloraError(f"adapter: {path} is not an onnxruntime adapter file ({first_line(exc)})") from None
    for name, value in params.items():
        shape = list(value.shape())
        if expected.get(name) != shape:
            raise MaloraError(
                f"adapter: {path} was made for another export: tensor {name} {shape} "
                f"does not fit ({expected.get(name, 'no such input')})"
            )
    if set(params) != set(expected):
        missing = sorted(set(expected) - set(params))[0]
        raise MaloraError(f"adapter: {path} was made for another export: it lacks {missing}")


def adapter_file_key(adapter: str | os.PathLike) -> tuple[str, int, int]:
    """``(resolved path, mtime ns, size)`` of an adapter file: runners load each version once under this key.

    A one-line MaloraError when the file does not exist."""
    path = Path(adapter)
    if not path.is_file():
        raise MaloraError(f"adapter: {adapter} does not exist")
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size
