"""capture — turn a model into a ``torch.fx.GraphModule`` the passes rewrite.

* HuggingFace transformers models go through ``torch.export.export(...,
  strict=False)`` with the batch and sequence dimensions of every input marked
  dynamic. The model is traced in eval mode with ``use_cache=False`` (see
  docs/architecture.md, 'Capture'),
  so base-model dropout is not part of the graph; the caller's train/eval flag
  and config are restored afterwards.
* Plain ``nn.Module``s go through ``torch.export`` too (every input dimension
  ``Dim.AUTO``), or through ``torch.fx.symbolic_trace`` with
  ``tracer="symbolic_trace"`` (or when export fails and ``tracer="auto"``).

Linear calls keep their module name: ``nn_module_stack`` in exported graphs,
the ``call_module`` target in symbolically traced ones. The returned module
records the output-head names (excluded by ``all-linear``), the base
parameter count, and the example inputs in ``gm.meta``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from ..errors import MaloraError, first_line
from ..passes import BASE_PARAMETERS_KEY, EXAMPLE_KWARGS_KEY, OUTPUT_HEADS_KEY

logger = logging.getLogger(__name__)

TRACERS = ("auto", "export", "symbolic_trace")


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def default_example_kwargs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Token inputs for a transformers model: ``input_ids`` and ``attention_mask``,
    plus ``token_type_ids`` when the model's forward takes them."""
    config = model.config
    device = next(model.parameters()).device
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}
    params = inspect.signature(model.forward).parameters
    if "token_type_ids" in params and getattr(config, "type_vocab_size", None):
        kwargs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long, device=device)
    return kwargs


def output_head_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's output heads (``get_output_embeddings``), else ``lm_head``."""
    names = {"lm_head"}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        names.update(name for name, module in model.named_modules() if module is head)
    return tuple(sorted(names))


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _tracing_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and no KV cache while tracing; restore the caller's state."""
    was_training = model.training
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None and old_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if config is not None and old_cache is not None:
            config.use_cache = old_cache


def _dynamic_shapes(args: tuple, kwargs: dict[str, Any], token_inputs: bool) -> tuple[Any, dict[str, Any]]:
    def spec(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return None
        dims = range(min(value.dim(), 2)) if token_inputs else range(value.dim())
        return {i: Dim.AUTO for i in dims}

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def capture(
    model: nn.Module,
    example_kwargs: dict[str, Any] | None = None,
    *,
    example_args: tuple = (),
    dynamic: bool = True,
    tracer: str = "auto",
) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule whose linear calls keep their names.

    Args:
        model: a transformers model or any ``nn.Module``.
        example_kwargs: example keyword inputs; transformers models default to
            ``input_ids`` / ``attention_mask`` of shape [2, 8].
        example_args: example positional inputs (plain modules).
        dynamic: mark batch and sequence (transformers) or all (plain) input
            dimensions dynamic.
        tracer: ``"auto"`` (export, falling back to symbolic_trace for plain
            modules), ``"export"`` or ``"symbolic_trace"``.

    Returns:
        A GraphModule. Call exported ones with exactly the keyword names of
        ``example_kwargs``.

    Example:
        >>> gm = capture(model, {"input_ids": ids, "attention_mask": mask})
    """
    if tracer not in TRACERS:
        raise MaloraError(f"tracer: unknown tracer {tracer!r}; allowed: {', '.join(TRACERS)}")
    hf = is_transformers_model(model)
    if example_kwargs is None and not example_args:
        if not hf:
            raise MaloraError("capture: a plain nn.Module needs example_args or example_kwargs")
        example_kwargs = default_example_kwargs(model)
    example_kwargs = dict(example_kwargs or {})
    if tracer == "symbolic_trace":
        gm = torch.fx.symbolic_trace(model)
    else:
        try:
            gm = _export(model, tuple(example_args), example_kwargs, dynamic, token_inputs=hf)
        except Exception as exc:
            if tracer == "export" or hf:
                raise MaloraError(
                    f"capture: torch.export failed for {type(model).__name__}: {first_line(exc)}"
                ) from exc
            logger.info("torch.export failed (%s); falling back to torch.fx.symbolic_trace", first_line(exc))
            gm = torch.fx.symbolic_trace(model)
    gm.meta[OUTPUT_HEADS_KEY] = output_head_names(model)
    gm.meta[BASE_PARAMETERS_KEY] = count_parameters(model)
    gm.meta[EXAMPLE_KWARGS_KEY] = list(example_kwargs)
    return gm


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool, token_inputs: bool) -> fx.GraphModule:
    arg_shapes, kwarg_shapes = _dynamic_shapes(args, kwargs, token_inputs)
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = {**dict(zip(_positional_names(model, len(args)), arg_shapes, strict=False)), **kwarg_shapes}
    with _tracing_state(model):
        exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    logger.info("captured %s with torch.export (%d nodes)", type(model).__name__, len(exported.graph.nodes))
    return exported.module()


def _positional_names(model: nn.Module, count: int) -> list[str]:
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [p.name for p in params[:count]]
