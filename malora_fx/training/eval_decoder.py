"""The models evaluation decodes with: a decoding step with an explicit KV cache.

:func:`cached_decoder` gives a :class:`CachedDecoder` of the base model (run eagerly with its own
cache) or of the model captured with its cache
(:func:`~malora_fx.graph.cached_decoder.capture_decoder`, what the ONNX export starts from) with a
run's or an adapted graph's adapters inserted; :func:`load_run_for_eval` opens a run directory for
:func:`~malora_fx.training.evaluate.evaluate`, the loss and the decoding from one graph. The
decoding itself (:func:`~malora_fx.training.evaluate.greedy_generate_cached`) only needs the
``DecodeFn`` call these objects provide.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import fx, nn

from .evaluate import LogitsFn, Past

__all__ = ["CachedDecoder", "cached_decoder", "load_run_for_eval"]


class CachedDecoder:
    """One decoding step with an explicit KV cache, as plain tensors:
    ``decoder(input_ids, attention_mask, position_ids, past) -> (logits, present)``.

    ``module`` takes the inputs of :class:`~malora_fx.graph.cached_decoder.DecoderWithCache`
    (that module itself, run eagerly, or a graph captured from it); ``past=None`` is an empty
    cache. ``attention_mask`` covers the caller's tokens: the past ones and the new ones.

    A captured graph only takes a cache and new tokens of ``min_length`` positions or more (its
    guards, from the example it was captured with): a shorter first call starts from a cache of
    zeros that the mask leaves out (keys masked, values zero), and every later call masks that
    prefix again (the columns the cache holds beyond ``attention_mask``). The cache is opaque to
    the caller, who only selects its rows (dim 0).
    """

    def __init__(self, module: nn.Module, config: Any, dtype: torch.dtype, min_length: int = 0) -> None:
        from ..graph.cached_decoder import cache_geometry

        self.module, self.dtype, self.min_length = module, dtype, min_length
        self.num_layers, self.kv_heads, self.head_dim = cache_geometry(config)

    def empty_past(self, batch: int, device: torch.device | str, length: int = 0) -> Past:
        shape = (batch, self.kv_heads, length, self.head_dim)
        empty = lambda: torch.zeros(shape, dtype=self.dtype, device=device)  # noqa: E731
        return tuple((empty(), empty()) for _ in range(self.num_layers))

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: Past | None
    ) -> tuple[torch.Tensor, Past]:
        batch, seq = input_ids.shape
        if past is None:
            past = self.empty_past(batch, input_ids.device, max(0, self.min_length - seq))
        prefix = (past[0][0].shape[2] if past else 0) + seq - attention_mask.shape[1]
        if prefix > 0:  # the masked zeros a short first call started from
            attention_mask = torch.cat([attention_mask.new_zeros(batch, prefix), attention_mask], dim=1)
        logits, present = self.module(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past
        )
        return logits, tuple((k, v) for k, v in present)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A :data:`LogitsFn`: the logits of whole (right-padded) rows, from an empty cache."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        return self(input_ids, attention_mask, positions, None)[0]

    def to(self, device: torch.device | str) -> CachedDecoder:
        from ..graph.move import move_to_device

        move_to_device(self.module, device)
        return self


def cached_decoder(model: nn.Module, adapted: fx.GraphModule | str | os.PathLike | None = None) -> CachedDecoder | None:
    """A :class:`CachedDecoder` of the HF causal LM ``model``, or ``None`` when it is not a decoder
    (an encoder: use the no-cache path).

    Without ``adapted``: ``model`` itself, run eagerly with its own cache (nothing is captured).
    With ``adapted``: ``model`` captured with its cache
    (:func:`~malora_fx.graph.cached_decoder.capture_decoder`, on ``model``'s current device: call
    this before moving the model to another one) and adapters inserted in eval mode — the same
    graph ``malora-fx export`` starts from. ``adapted`` is either a run directory of ``model``
    (its adapters loaded by :func:`~malora_fx.adapters.run_dir.apply_run_adapters`) or a
    transformed graph of ``model``, not merged (its config, and its adapter tensors copied; the
    sites must be the same, else ``ValueError``).
    """
    from ..adapters.files import read_adapter_config
    from ..adapters.run_dir import apply_run_adapters
    from ..adapters.transform import get_config, set_adapters_training, transform
    from ..graph.cached_decoder import DecoderWithCache, capture_decoder, is_decoder
    from ..passes import adapter_modules

    if not is_decoder(model):
        return None
    dtype = next(model.parameters()).dtype
    if adapted is None:
        return CachedDecoder(DecoderWithCache(model).eval(), model.config, dtype)
    gm, example = capture_decoder(model, dtype)
    min_length = int(example["attention_mask"].shape[1])
    if not isinstance(adapted, fx.GraphModule):
        gm = apply_run_adapters(gm, adapted, read_adapter_config(adapted))
        return CachedDecoder(gm, model.config, dtype, min_length=min_length)
    source = adapter_modules(adapted)
    gm = transform(gm, get_config(adapted))
    target = adapter_modules(gm)
    if set(target) != set(source):
        missing = sorted(set(source) ^ set(target))
        raise ValueError(f"cached_decoder: the adapted graph and the captured decoder differ in sites ({missing[0]!r})")
    with torch.no_grad():
        for fqn, layer in target.items():
            layer.load_state_dict(source[fqn].state_dict())
    set_adapters_training(gm, False)
    return CachedDecoder(gm, model.config, dtype, min_length=min_length)


def load_run_for_eval(
    run_dir: str | os.PathLike, *, use_cache: bool = True, device: str = "cpu"
) -> tuple[LogitsFn, CachedDecoder | None, Any]:
    """``(logits_fn, decoder, loaded)`` of a run directory's adapted model on ``device``, for :func:`evaluate`.

    With ``use_cache`` and a decoder base model, both come from one graph: the model captured with
    its KV cache and the run's adapters (:func:`cached_decoder`), so the model is captured once.
    Otherwise (``use_cache=False``, or an encoder) ``decoder`` is ``None`` and ``logits_fn`` is the
    plain adapted graph of :func:`~malora_fx.adapters.run_dir.load_run`. ``loaded`` is the base
    model and tokenizer (:class:`~malora_fx.graph.sources.LoadedModel`).
    """
    from ..adapters.run_dir import apply_run_adapters, read_run
    from ..errors import MaloraError

    info, loaded = read_run(run_dir)
    if loaded.tokenizer is None:
        raise MaloraError(f"base model {info['base_model']!r} has no tokenizer")
    decoder = cached_decoder(loaded.model, run_dir) if use_cache else None
    if decoder is not None:
        return decoder.to(device).logits, decoder, loaded
    from ..graph.move import move_to_device

    gm = move_to_device(apply_run_adapters(loaded.model, run_dir, info), device)
    return (lambda ids, mask: gm(input_ids=ids, attention_mask=mask).logits), None, loaded
