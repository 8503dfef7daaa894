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
  :class:`~malora_fx.training.eval_decoder.CachedDecoder` (built in
  :mod:`malora_fx.training.eval_decoder`: the base model run eagerly with its
  cache, or the model captured with its cache and a run's or an adapted
  graph's adapters inserted; ``load_run_for_eval`` takes the loss from that
  same graph, so a run is captured once). One prefill reads the right-padded prompts; every later step
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

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE, Encoded, Example, collate, encode, pad_id
from .suites import check_answer

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Past = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (key, value) [batch, kv heads, length, head dim] per layer
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "Past | None"], tuple[torch.Tensor, Past]]
"""``(input_ids, attention_mask, position_ids, past or None) -> (logits, present)``; e.g. an
:class:`~malora_fx.training.eval_decoder.CachedDecoder`."""


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

    Prompts are batched by length. With ``decoder`` (a
    :class:`~malora_fx.training.eval_decoder.CachedDecoder` of the same model) decoding uses the KV
    cache (:func:`greedy_generate_cached`), else ``logits_fn`` without one (:func:`greedy_generate`).
    ``max_new_tokens`` defaults to the longest reference response + 2.
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
