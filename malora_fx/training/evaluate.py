"""Evaluation: per-task loss on response tokens and exact match by greedy decoding.

Both work on any ``logits_fn(input_ids, attention_mask) -> logits`` — a
transformed GraphModule or the untransformed base model — so the adapted and
base numbers come from the same code. Examples are tokenised by
:func:`~malora_fx.training.data.encode`, so the prompts greedy decoding starts
from are exactly :func:`~malora_fx.training.data.format_prompt`'s (the ids
training saw and ``malora-fx run`` feeds).

Greedy decoding has two paths with the same result token for token:

* **With a KV cache** (:func:`greedy_generate_cached`, used when ``exact_match``
  / ``evaluate`` get a ``decoder``; ``malora-fx eval``'s default): a
  :class:`CachedDecoder` from :func:`cached_decoder` — the base model run
  eagerly with its cache, or the model captured with its cache
  (:func:`~malora_fx.graph.cached_decoder.capture_decoder`, what the ONNX
  export uses) with a run's or an adapted graph's adapters inserted
  (:func:`load_run_for_eval` takes the loss from that same graph, so a run is
  captured once). One prefill reads the right-padded prompts; every later step
  feeds one token per row at its own position (``position_ids`` = the row's
  length so far), and the attention mask leaves the padding gap between a
  short prompt and its generated tokens out, so each row sees exactly what it
  would alone. Rows that stop leave the batch (and the cache).
* **Without a cache** (:func:`greedy_generate`, the fallback for encoders or a
  plain ``logits_fn``; ``malora-fx eval --no-cache``): each step re-reads
  every row up to its own length, takes the logits at its last real token and
  writes the next token after it. Right padding keeps the real tokens'
  positions and attention exactly as for a single row.

Both take the argmax at each row's last real token and stop a row at a stop id
(:func:`stop_token_ids`, excluded from the output) or after ``max_new_tokens``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .data import IGNORE, Encoded, Example, collate, encode, pad_id
from .suites import check_answer

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Past = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (key, value) [batch, kv heads, length, head dim] per layer
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "Past | None"], tuple[torch.Tensor, Past]]
"""``(input_ids, attention_mask, position_ids, past or None) -> (logits, present)``; a :class:`CachedDecoder`."""


@torch.no_grad()
def task_losses(
    logits_fn: LogitsFn, tokenizer, examples: Sequence[Example], max_length: int, batch_size: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Mean cross-entropy over response tokens, per task: ``{task: {"loss", "tokens"}}``."""
    pad = pad_id(tokenizer)
    encoded = [encode(e, tokenizer, max_length) for e in examples]
    sums: dict[str, list[float]] = {}
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        items = [encoded[i] for i in order[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(items, pad).items()}
        logits = logits_fn(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
        labels = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        for row, item in enumerate(items):
            valid = labels[row] != IGNORE
            acc = sums.setdefault(item.task, [0.0, 0])
            acc[0] += float(per_token[row][valid].sum())
            acc[1] += int(valid.sum())
    return {t: {"loss": s / max(n, 1), "tokens": n} for t, (s, n) in sorted(sums.items())}


def stop_token_ids(tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's eos and a chat template's end-of-turn marker."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


@torch.no_grad()
def greedy_generate(
    logits_fn: LogitsFn,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    device: str = "cpu",
) -> list[list[int]]:
    """Greedy continuation of each prompt, up to ``max_new_tokens`` or a stop token (excluded)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max()) + max_new_tokens
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    rows = torch.arange(len(prompts), device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        span = int(lengths.max())
        mask = (torch.arange(span, device=device)[None, :] < lengths[:, None]).long()
        logits = logits_fn(ids[:, :span], mask)
        nxt = logits[rows, lengths - 1].argmax(-1)
        for row in range(len(prompts)):
            if finished[row]:
                continue
            token = int(nxt[row])
            if token in stop_ids:
                finished[row] = True
            else:
                out[row].append(token)
        ids[rows, lengths] = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        lengths = lengths + (~finished).long()
        if bool(finished.all()):
            break
    return out


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


@torch.no_grad()
def greedy_generate_cached(
    decoder: DecodeFn,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    device: str = "cpu",
) -> list[list[int]]:
    """:func:`greedy_generate` with a KV cache: the same tokens, one prefill then one token per row and step.

    The prompts are right-padded for the prefill; each later token goes at its row's own position
    with the padding gap masked out, so every row decodes as it would alone. A row that stops
    (stop token or ``max_new_tokens``) leaves the batch and the cache.
    """
    out: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens < 1:
        return out
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), device=device)
    mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    logits, past = decoder(ids, mask, positions, None)
    nxt = logits[torch.arange(len(prompts), device=device), lengths - 1].argmax(-1)
    alive = list(range(len(prompts)))  # the prompt of each batch row
    for step in range(max_new_tokens):
        keep = []
        for j, (row, token) in enumerate(zip(alive, nxt.tolist(), strict=True)):
            if token not in stop_ids:
                out[row].append(token)
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device)
            alive = [alive[j] for j in keep]
            nxt, lengths, mask = nxt[index], lengths[index], mask[index]
            past = tuple((k[index], v[index]) for k, v in past)
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits, past = decoder(nxt[:, None], mask, lengths[:, None], past)
        nxt = logits[:, -1].argmax(-1)
        lengths = lengths + 1
    return out


def greedy_predictions(
    logits_fn: LogitsFn | None,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_length: int,
    batch_size: int,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    decoder: DecodeFn | None = None,
) -> list[list[int]]:
    """The greedy continuation of each example's prompt (token ids, stop token excluded), in ``examples``' order.

    Prompts are batched by length. With ``decoder`` (a :class:`CachedDecoder` of the same model)
    decoding uses the KV cache (:func:`greedy_generate_cached`), else ``logits_fn`` without one
    (:func:`greedy_generate`). ``max_new_tokens`` defaults to the longest reference response + 2.
    """
    pad = pad_id(tokenizer)
    encoded: list[Encoded] = [encode(e, tokenizer, max_length) for e in examples]
    if not encoded:
        return []
    if max_new_tokens is None:
        max_new_tokens = max(len(e.input_ids) - e.prompt_length for e in encoded) + 2
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer), pad_id=pad, device=device
    )
    predictions: list[list[int]] = [[] for _ in examples]
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].prompt_length)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        prompts = [encoded[i].input_ids[: encoded[i].prompt_length] for i in chunk]
        if decoder is not None:
            outs = greedy_generate_cached(decoder, prompts, **options)
        elif logits_fn is not None:
            outs = greedy_generate(logits_fn, prompts, **options)
        else:
            raise ValueError("greedy_predictions: give logits_fn or decoder")
        for i, tokens in zip(chunk, outs, strict=True):
            predictions[i] = tokens
    return predictions


def exact_match(
    logits_fn: LogitsFn | None,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_length: int,
    batch_size: int,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    decoder: DecodeFn | None = None,
) -> dict[str, dict[str, float]]:
    """Greedy-decode each prompt and compare with the response: ``{task: {"exact_match", "n"}}``.

    Decoding as :func:`greedy_predictions`: with the KV cache when ``decoder`` is given.
    """
    predictions = greedy_predictions(
        logits_fn,
        tokenizer,
        examples,
        max_length=max_length,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        decoder=decoder,
    )
    hits: dict[str, list[int]] = {}
    for example, tokens in zip(examples, predictions, strict=True):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        acc = hits.setdefault(example.task, [0, 0])
        acc[0] += int(check_answer(example.response, text))
        acc[1] += 1
    return {t: {"exact_match": h / n, "n": n} for t, (h, n) in sorted(hits.items())}


def evaluate(
    logits_fn: LogitsFn,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    decoder: DecodeFn | None = None,
) -> dict[str, dict[str, float]]:
    """Per-task ``loss`` and ``exact_match`` (and ``n``), plus an ``"average"`` row.

    ``decoder``: greedy decoding with a KV cache (see :func:`exact_match`); the loss uses ``logits_fn``.
    """
    losses = task_losses(logits_fn, tokenizer, examples, max_length, batch_size, device)
    matches = exact_match(
        logits_fn,
        tokenizer,
        examples,
        max_length=max_length,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        decoder=decoder,
    )
    table = {
        t: {"loss": losses[t]["loss"], "exact_match": matches[t]["exact_match"], "n": matches[t]["n"]} for t in losses
    }
    table["average"] = {
        "loss": sum(r["loss"] for r in table.values()) / len(table),
        "exact_match": sum(r["exact_match"] for r in table.values()) / len(table),
        "n": sum(r["n"] for r in table.values()),
    }
    return table
