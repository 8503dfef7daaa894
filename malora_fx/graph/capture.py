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
* The example tensors are traced as contiguous copies, so a slice or view of a
  bigger batch captures like a fresh tensor. A dynamic dimension of size 1 is
  traced at size 2 (the example repeated along it): ``torch.export`` fixes
  size-1 dimensions, so a batch-1 or length-1 example would otherwise give a
  graph that accepts only that size.
* Example keyword values that are not tensors (``use_cache=False``, an int,
  ``None``) are constants baked into the graph, not inputs; the graph accepts
  them again with the same value (and refuses another one), so the captured
  ``example_kwargs`` still call it.

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
from .constants import BakedConstants, bound_constants, split_constants

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


def _dynamic_dims(value: Any, token_inputs: bool) -> range:
    """The dimensions of an example value marked dynamic: batch and sequence (token inputs) or all."""
    if not isinstance(value, torch.Tensor):
        return range(0)
    return range(min(value.dim(), 2)) if token_inputs else range(value.dim())


def _dynamic_shapes(args: tuple, kwargs: dict[str, Any], token_inputs: bool) -> tuple[Any, dict[str, Any]]:
    def spec(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return None
        return {i: Dim.AUTO for i in _dynamic_dims(value, token_inputs)}

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def traceable_example(value: Any) -> Any:
    """A contiguous copy of a token-input example tensor, batch and sequence of size 1 repeated to 2, for tracing."""
    return _traceable(value, _dynamic_dims(value, token_inputs=True))


def _traceable(value: Any, dims: range) -> Any:
    """A contiguous copy of an example tensor, repeated to size 2 along its size-1 dynamic ``dims``."""
    if not isinstance(value, torch.Tensor):
        return value
    copy = value.detach().clone(memory_format=torch.contiguous_format)
    repeats = [2 if i in dims and size == 1 else 1 for i, size in enumerate(value.shape)]
    if any(r > 1 for r in repeats):
        copy = copy.repeat(*repeats)
    return copy.requires_grad_(value.requires_grad and value.is_leaf)


def _size_one_dims(args: tuple, kwargs: dict[str, Any], token_inputs: bool) -> list[str]:
    """``example_kwargs["x"] dimension i`` for every dynamic dimension of size 1 in the examples."""
    named = [
        *((f"example_args[{i}]", a) for i, a in enumerate(args)),
        *((f'example_kwargs["{k}"]', v) for k, v in kwargs.items()),
    ]
    return [
        f"{name} dimension {i}"
        for name, value in named
        for i in _dynamic_dims(value, token_inputs)
        if value.shape[i] == 1
    ]


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
            ``input_ids`` / ``attention_mask`` of shape [2, 8]. Tensors are traced
            as contiguous copies (a slice of a bigger batch is fine) and may have
            batch or sequence length 1: the graph stays dynamic in those
            dimensions. Values that are not tensors (``use_cache=False``,
            ``return_dict=True``, an int, ``None``) are constants baked into the
            graph: they are not graph inputs (nor ONNX inputs), a call may repeat
            them with the same value and refuses another value.
        example_args: example positional inputs (plain modules).
        dynamic: mark batch and sequence (transformers) or all (plain) input
            dimensions dynamic.
        tracer: ``"auto"`` (export, falling back to symbolic_trace for plain
            modules), ``"export"`` or ``"symbolic_trace"``.

    Returns:
        A GraphModule. Call exported ones with the keyword names of the tensors
        in ``example_kwargs`` (plus, optionally, its constants, unchanged);
        ``gm.meta[EXAMPLE_KWARGS_KEY]`` lists those tensor names.

    Example:
        >>> gm = capture(model, {"input_ids": ids[:2, :16], "attention_mask": mask[:2, :16], "use_cache": False})
        >>> gm(input_ids=ids, attention_mask=mask)  # any batch and length
    """
    if tracer not in TRACERS:
        raise MaloraError(f"tracer: unknown tracer {tracer!r}; allowed: {', '.join(TRACERS)}")
    hf = is_transformers_model(model)
    if example_kwargs is None and not example_args:
        if not hf:
            raise MaloraError("capture: a plain nn.Module needs example_args or example_kwargs")
        example_kwargs = default_example_kwargs(model)
    inputs, constants = split_constants(dict(example_kwargs or {}))
    if tracer == "symbolic_trace":
        gm = _symbolic_trace(model, constants)
    else:
        try:
            gm = _export(model, tuple(example_args), inputs, constants, dynamic, token_inputs=hf)
        except MaloraError:
            raise
        except Exception as exc:
            if tracer == "export" or hf:
                raise MaloraError(
                    f"capture: torch.export failed for {type(model).__name__}: {first_line(exc)}"
                ) from exc
            logger.info("torch.export failed (%s); falling back to torch.fx.symbolic_trace", first_line(exc))
            gm = _symbolic_trace(model, constants)
    if constants:
        gm.register_forward_pre_hook(BakedConstants(constants), with_kwargs=True, prepend=True)
    gm.meta[OUTPUT_HEADS_KEY] = output_head_names(model)
    gm.meta[BASE_PARAMETERS_KEY] = count_parameters(model)
    gm.meta[EXAMPLE_KWARGS_KEY] = list(inputs)
    return gm


def _symbolic_trace(model: nn.Module, constants: dict[str, Any]) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with ``constants`` baked in and dropped from the signature.

    FX keeps a placeholder per concrete argument, feeding only a check of its value; the
    placeholder and its checks go, so the graph's inputs are the tensors alone.
    """
    gm = torch.fx.symbolic_trace(model, concrete_args=constants or None)
    if not constants:
        return gm
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for param, node in zip(params, placeholders, strict=False):
        if param.name not in constants:
            continue
        checks: set[fx.Node] = set()
        stack = [node]
        while stack:
            for user in stack.pop().users:
                if user not in checks:
                    checks.add(user)
                    stack.append(user)
        for check in [n for n in reversed(gm.graph.nodes) if n in checks]:
            gm.graph.erase_node(check)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _export(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    constants: dict[str, Any],
    dynamic: bool,
    token_inputs: bool,
) -> fx.GraphModule:
    """``torch.export`` of ``model`` on contiguous copies of the examples, size-1 dynamic dimensions traced at 2."""
    arg_shapes, kwarg_shapes = _dynamic_shapes(args, kwargs, token_inputs)
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = {**dict(zip(_positional_names(model, len(args)), arg_shapes, strict=False)), **kwarg_shapes}

    def trace(expand: bool) -> fx.GraphModule:
        def dims(value: Any) -> range:
            return _dynamic_dims(value, token_inputs) if expand else range(0)

        trace_args = tuple(_traceable(a, dims(a)) for a in args)
        trace_kwargs = {k: _traceable(v, dims(v)) for k, v in kwargs.items()}
        with _tracing_state(model), bound_constants(model, constants):
            exported = torch.export.export(model, trace_args, trace_kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        logger.info("captured %s with torch.export (%d nodes)", type(model).__name__, len(exported.graph.nodes))
        return exported.module()

    size_one = _size_one_dims(args, kwargs, token_inputs) if dynamic else []
    if not size_one:
        return trace(expand=False)
    try:
        return trace(expand=True)
    except Exception as exc:
        if token_inputs:
            raise MaloraError(
                f"{size_one[0]}: size 1 would fix the captured graph to that size, and tracing with it repeated to "
                f"size 2 failed ({first_line(exc)}); pass an example with size >= 2 there"
            ) from exc
        # plain modules mark every dimension dynamic, some of which may really be 1 (a feature width)
        gm = trace(expand=False)
        logger.warning("capture: %s kept at size 1 (tracing at size 2 failed)", ", ".join(size_one))
        return gm


def _positional_names(model: nn.Module, count: int) -> list[str]:
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [p.name for p in params[:count]]
