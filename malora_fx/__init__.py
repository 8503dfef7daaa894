"""malora-fx: insert, train, fold, lower and export MALoRA adapters with graph passes.

Public API (a contract; see README.md for examples):

    capture(model, example_kwargs) -> GraphModule
    MALoRAConfig(method, targets, num_experts, top_k, rank, shared_rank, alpha,
                 beta, dropout, normalize_top_k, aux_loss_coef, seed)
    transform(model, config, example_kwargs=...) -> GraphModule
    aux_loss(gm, attention_mask=None)
    trainable_parameters(gm)
    set_adapters_training(gm, training)
    save_adapters(gm, dir) / load_adapters(gm, dir)
    merge(gm) / lower(gm) / export_onnx(gm, out_dir, example_kwargs)
    export_run(run_dir, out_dir)   (a run directory's base model + adapters, with KV cache)
    load_model(source) / fetch(name)
"""

from . import passes as _passes  # noqa: F401  (malora_fx.passes is the top-level passes/ folder)
from .adapters.config import MALoRAConfig
from .adapters.files import load_adapters, read_adapter_config, save_adapters
from .adapters.transform import (
    adapter_layers,
    aux_loss,
    get_config,
    set_adapters_training,
    trainable_parameters,
    transform,
)
from .deploy.merge_lower import lower, merge
from .deploy.onnx_export import export_onnx, export_run
from .errors import (
    AdapterFileError,
    ConfigError,
    MaloraError,
    ModelSourceError,
    TargetError,
)
from .graph.capture import capture
from .graph.sources import fetch, load_model

__all__ = [
    "AdapterFileError", "ConfigError", "MALoRAConfig", "MaloraError", "ModelSourceError", "TargetError",
    "adapter_layers", "aux_loss", "capture", "fetch", "get_config", "load_adapters", "load_model", "export_onnx", "export_run", "lower", "merge",
    "read_adapter_config", "save_adapters", "set_adapters_training", "trainable_parameters", "transform",
]
__version__ = "0.1.0"
