"""Non-tensor example kwargs baked into a captured graph as constants.

``use_cache=False`` (or any bool / int / float / str / None example value) is
not a graph input: capture binds it while tracing (``bound_constants``), and a
forward pre-hook (``BakedConstants``) drops it from later calls when it holds
the captured value and refuses another value in one line. ``graph_kwargs``
gives the tensor kwargs an export passes to the graph.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from ..errors import MaloraError

CONSTANT_TYPES = (bool, int, float, str, type(None))  # example kwargs of these types are baked into the graph


def split_constants(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(graph inputs, constants): example kwargs that are bool / int / float / str / None become constants."""
    inputs = {k: v for k, v in kwargs.items() if not isinstance(v, CONSTANT_TYPES)}
    constants = {k: v for k, v in kwargs.items() if isinstance(v, CONSTANT_TYPES)}
    return inputs, constants


class BakedConstants:
    """Forward pre-hook of a captured graph: the non-tensor example kwargs baked into it at capture.

    A call may repeat them with the same value (they are dropped before the graph runs); another
    value is refused, since the graph was traced with the captured one.
    """

    def __init__(self, constants: Mapping[str, Any]) -> None:
        self.constants = dict(constants)

    def graph_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``kwargs`` without the baked constants; a baked key with another value is a MaloraError."""
        out = {}
        for key, value in kwargs.items():
            if key not in self.constants:
                out[key] = value
            elif not _same_constant(value, self.constants[key]):
                raise MaloraError(
                    f"{key}={value!r}: this graph was captured with {key}={self.constants[key]!r}, a constant baked "
                    f"into it; pass {key}={self.constants[key]!r} or nothing, or capture again with the value you want"
                )
        return out

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, self.graph_kwargs(kwargs)


def _same_constant(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _hook(gm: nn.Module) -> BakedConstants | None:
    """The ``BakedConstants`` pre-hook capture registered on ``gm``, if any."""
    return next((h for h in gm._forward_pre_hooks.values() if isinstance(h, BakedConstants)), None)


def baked_constants(gm: nn.Module) -> dict[str, Any]:
    """The non-tensor example kwargs baked into a captured graph at capture (``{}`` when none)."""
    hook = _hook(gm)
    return {} if hook is None else dict(hook.constants)


def graph_kwargs(gm: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the constants baked into ``gm`` at capture (checked to hold the captured values)."""
    hook = _hook(gm)
    return dict(kwargs) if hook is None else hook.graph_kwargs(kwargs)


@contextlib.contextmanager
def bound_constants(model: nn.Module, constants: dict[str, Any]) -> Iterator[None]:
    """``model.forward`` with ``constants`` bound while tracing, so they are not graph inputs."""
    if not constants:
        yield
        return
    had_own = "forward" in model.__dict__
    own = model.__dict__.get("forward")
    model.__dict__["forward"] = functools.partial(model.forward, **constants)  # the instance's, not the class's
    try:
        yield
    finally:
        if had_own:
            model.__dict__["forward"] = own
        else:
            del model.__dict__["forward"]
