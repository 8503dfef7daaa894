"""malora-fx: insert, train, fold, lower and export MALoRA adapters with graph passes.

Public API (a contract; see README.md for examples), by pipeline stage:

    graph      load_model(source) / fetch(name)
               capture(model, example_kwargs) -> GraphModule
               capture_decoder(model) -> (GraphModule with a KV cache, example inputs)
    adapters   MALoRAConfig(method, targets, num_experts, top_k, rank, shared_rank, alpha,
                            beta, dropout, normalize_top_k, aux_loss_coef, seed)
               transform(model, config, example_kwargs=...) -> GraphModule;  plan(model, config)
               aux_loss(gm, attention_mask=None) / trainable_parameters(gm) / set_adapters_training(gm, training)
               adapter_layers(gm) / get_config(gm)
               save_adapters(gm, dir) / load_adapters(gm, dir) / read_adapter_config(dir) / load_run(run_dir)
    train      train(run_dir_or_gm, data, TrainArgs(...)) -> TrainResult;  write_suite(suite, out_dir, ...)
               evaluate(logits_fn, tokenizer, examples) / expert_load(gm, tokenizer, examples)
    deploy     merge(gm) / lower(gm) / export_onnx(gm, out_dir, example_kwargs)
               export_run(run_dir, out_dir) / export_decoder_graph(gm, example, config, out_dir)
               verify_export(export_dir, run_dir) (the export against the run's PyTorch model)
               export_adapter(run_dir, file) / ExportManifest.read(export_dir) / OrtGenerator(export_dir)
               GenaiGenerator(export_dir) (onnxruntime-genai) / open_generator(export_dir, backend="auto")

The stages live in ``malora_fx.graph``, ``malora_fx.adapters``,
``malora_fx.training`` and ``malora_fx.deploy``; the graph passes in
``malora_fx.passes``. docs/architecture.md says which file owns what.
"""

from . import passes as _passes  # noqa: F401  (malora_fx.passes is the top-level passes/ folder)
from .adapters.config import MALoRAConfig
from .adapters.files import load_adapters, read_adapter_config, save_adapters
from .adapters.run_dir import load_run
from .adapters.transform import (
    adapter_layers,
    aux_loss,
    get_config,
    plan,
    set_adapters_training,
    trainable_parameters,
    transform,
)
from .deploy.adapter_file import export_adapter
from .deploy.backends import open_generator
from .deploy.genai_runner import GenaiGenerator
from .deploy.manifest import ExportManifest
from .deploy.merge_lower import lower, merge
from .deploy.onnx_export import export_decoder_graph, export_onnx, export_run
from .deploy.runner import OrtGenerator
from .deploy.verify import verify_export
from .errors import AdapterFileError, ConfigError, MaloraError, ModelSourceError, TargetError
from .graph.cached_decoder import capture_decoder
from .graph.capture import capture
from .graph.move import move_to_device
from .graph.sources import fetch, load_model
from .training.args import TrainArgs
from .training.evaluate import evaluate
from .training.loop import TrainResult, train
from .training.routing_report import expert_load
from .training.suites import write_suite

__all__ = [
    "AdapterFileError",
    "ConfigError",
    "ExportManifest",
    "GenaiGenerator",
    "MALoRAConfig",
    "MaloraError",
    "ModelSourceError",
    "OrtGenerator",
    "TargetError",
    "TrainArgs",
    "TrainResult",
    "adapter_layers",
    "aux_loss",
    "capture",
    "capture_decoder",
    "evaluate",
    "expert_load",
    "export_adapter",
    "export_decoder_graph",
    "export_onnx",
    "export_run",
    "fetch",
    "get_config",
    "load_adapters",
    "load_model",
    "load_run",
    "lower",
    "merge",
    "move_to_device",
    "open_generator",
    "verify_export",
    "plan",
    "read_adapter_config",
    "save_adapters",
    "set_adapters_training",
    "train",
    "trainable_parameters",
    "transform",
    "write_suite",
]
__version__ = "0.1.0"
