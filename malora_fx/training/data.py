"""Multi-task training data: JSONL reading, tokenisation, task sampling, batching.

Each line of a data file is one JSON object, either
``{"task": str, "prompt": str, "response": str}`` or
``{"task": str, "messages": [{"role": ..., "content": ...}, ...]}`` whose last
message is the assistant's response. The loss covers the response tokens only
(labels ``-100`` elsewhere). Sequences longer than ``max_length`` are cut on
the right and counted.

Prompt formatting (:func:`format_prompt`) is one rule shared by training,
evaluation, ``malora-fx run``, the quickstart and the routing report:

* the text is the tokenizer's chat template (``add_generation_prompt=True``)
  when it has one, else the messages' contents joined by newlines plus a final
  ``"\\n"``;
* it is tokenised with the special tokens the tokenizer itself adds
  (``add_special_tokens=True``): a BOS it prepends is kept, unless the text
  already starts with it (a template that writes BOS itself), so BOS is never
  doubled; an EOS the tokenizer appends is dropped from the prompt (the
  prompt does not end the sequence);
* a training example is that prompt followed by the response: the rest of the
  chat template's text (its end-of-turn marker included) with a template,
  else the response's tokens and ``eos``.

The batch schedule of a whole run is a pure function of (examples, batch size,
steps, sampling, seed), so a resumed run sees exactly the batches it would have
seen: the data position is just the step number.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MaloraError

IGNORE = -100
SAMPLING_HELP = "proportional, uniform or temperature:T with T > 0"


class DataError(MaloraError):
    """A data file is missing, empty or malformed (message starts with file:line)."""


@dataclass(frozen=True)
class Example:
    task: str
    messages: tuple[tuple[str, str], ...]  # (role, content); the last one is the response

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:-1]]

    @property
    def response(self) -> str:
        return self.messages[-1][1]

    @property
    def prompt(self) -> str:
        return self.messages[-2][1] if len(self.messages) >= 2 else ""


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ``input_ids`` (prompt + response), ``labels`` and the prompt length."""

    task: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int
    truncated: bool


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a JSONL data file; errors read ``file:line: what is wrong``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path}: empty data file (expected one JSON object per line)")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    task = obj.get("task")
    if not isinstance(task, str) or not task:
        raise DataError(f'{where}: "task" must be a non-empty string')
    if "messages" in obj:
        return Example(task, _parse_messages(obj["messages"], where))
    for key in ("prompt", "response"):
        if not isinstance(obj.get(key), str):
            raise DataError(f'{where}: "{key}" must be a string (or give "messages")')
    return Example(task, (("user", obj["prompt"]), ("assistant", obj["response"])))


def _parse_messages(messages: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    parsed = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DataError(f'{where}: messages[{i}] must be an object with string "role" and "content"')
        parsed.append((msg["role"], msg["content"]))
    if parsed[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's response, got role {parsed[-1][0]!r}")
    return tuple(parsed)


PromptLike = str | Sequence[Mapping[str, str]]


def _messages(prompt: PromptLike) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_string(tokenizer, messages: list[dict[str, str]]) -> str:
    if has_chat_template(tokenizer):
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return "\n".join(m["content"] for m in messages) + "\n"


def prompt_text(example: Example, tokenizer) -> str:
    """The text the model sees before the response (chat template when available)."""
    return _prompt_string(tokenizer, example.prompt_messages)


def _special_affixes(tokenizer, text: str) -> tuple[list[int], list[int], list[int]]:
    """``(plain, prefix, suffix)``: the text's ids without special tokens and the ids the tokenizer adds
    before and after them with ``add_special_tokens=True``."""
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    n = len(plain)
    for k in range(len(full) - n + 1):
        if full[k : k + n] == plain:
            return plain, full[:k], full[k + n :]
    # the tokenizer changes the text's own tokens when it adds special ones: read the affixes off the ends
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    head = 0
    while head < len(full) and full[head] in special:
        head += 1
    tail = len(full)
    while tail > head and full[tail - 1] in special:
        tail -= 1
    return full[head:tail], full[:head], full[tail:]


def _tokenize_prompt(tokenizer, text: str) -> list[int]:
    plain, prefix, _suffix = _special_affixes(tokenizer, text)  # an appended EOS does not belong after a prompt
    if prefix and plain[: len(prefix)] == prefix:
        prefix = []  # the text (a chat template) already starts with the tokenizer's BOS: never twice
    return prefix + plain


def format_prompt(tokenizer, prompt: PromptLike, *, raw: bool = False) -> list[int]:
    """Token ids of a prompt exactly as training, evaluation and ``run`` feed it to the model.

    ``prompt`` is a user message (``str``) or a list of ``{"role", "content"}`` messages. With a chat
    template the text is the template with the generation prompt, else the contents joined by newlines
    plus ``"\\n"`` (the separator training puts before the response). The tokenizer's own special
    tokens are added (its BOS once, never twice). ``raw=True`` takes a ``str`` prompt as the exact text
    (no template, no newline), still with the tokenizer's BOS.
    """
    if raw:
        if not isinstance(prompt, str):
            raise TypeError("format_prompt: raw=True needs the prompt as one string")
        return _tokenize_prompt(tokenizer, prompt)
    return _tokenize_prompt(tokenizer, _prompt_string(tokenizer, _messages(prompt)))


def encode(example: Example, tokenizer, max_length: int) -> Encoded:
    """Tokenise one example: :func:`format_prompt` then the response; the loss covers the response only."""
    prompt = prompt_text(example, tokenizer)
    prompt_ids = _tokenize_prompt(tokenizer, prompt)
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(
            [*example.prompt_messages, {"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise DataError(f"task {example.task!r}: the chat template does not extend the prompt; cannot mask it")
        response_ids = list(tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"])
    else:
        response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            response_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    return Encoded(example.task, tuple(ids[:max_length]), tuple(labels[:max_length]), len(prompt_ids), truncated)


def encode_all(examples: Sequence[Example], tokenizer, max_length: int) -> tuple[list[Encoded], int]:
    """Encode every example; returns them and how many were truncated."""
    encoded = [encode(e, tokenizer, max_length) for e in examples]
    return encoded, sum(e.truncated for e in encoded)


def parse_sampling(spec: str) -> tuple[str, float]:
    """``proportional`` → T=1, ``uniform`` → T=inf, ``temperature:T``."""
    if spec == "proportional":
        return spec, 1.0
    if spec == "uniform":
        return spec, math.inf
    match = re.fullmatch(r"temperature:([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", spec)
    if match and float(match.group(1)) > 0:
        return "temperature", float(match.group(1))
    raise MaloraError(f"task sampling: unknown mode {spec!r}; allowed: {SAMPLING_HELP}")


def task_probabilities(tasks: Sequence[str], sampling: str) -> dict[str, float]:
    """Sampling probability of each task: ``n_t^(1/T)`` normalised (uniform for T=inf)."""
    _, temperature = parse_sampling(sampling)
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task] = counts.get(task, 0) + 1
    weights = {t: (1.0 if math.isinf(temperature) else n ** (1.0 / temperature)) for t, n in counts.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in sorted(weights.items())}


def plan_batches(
    encoded: Sequence[Encoded], *, batch_size: int, num_batches: int, sampling: str, seed: int, group_size: int = 32
) -> list[list[int]]:
    """The run's batch schedule: ``num_batches`` lists of example indices.

    Tasks are drawn with :func:`task_probabilities`; within a task, examples
    come in a fresh seeded permutation each pass. Every ``group_size`` batches
    are formed from examples sorted by length (length grouping: little padding)
    and then put in a seeded random order.
    """
    gen = torch.Generator().manual_seed(seed)
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(encoded):
        by_task.setdefault(e.task, []).append(i)
    probs = task_probabilities([e.task for e in encoded], sampling)
    names = list(probs)
    weights = torch.tensor([probs[t] for t in names], dtype=torch.float64)
    queues: dict[str, list[int]] = {t: [] for t in names}

    def next_of(task: str) -> int:
        if not queues[task]:
            pool = by_task[task]
            queues[task] = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
        return queues[task].pop()

    batches: list[list[int]] = []
    while len(batches) < num_batches:
        count = min(group_size, num_batches - len(batches))
        draws = torch.multinomial(weights, count * batch_size, replacement=True, generator=gen).tolist()
        picked = sorted((next_of(names[d]) for d in draws), key=lambda i: (len(encoded[i].input_ids), i))
        group = [picked[k * batch_size : (k + 1) * batch_size] for k in range(count)]
        batches.extend(group[j] for j in torch.randperm(count, generator=gen).tolist())
    return batches


def pad_id(tokenizer) -> int:
    """The padding token id: the tokenizer's pad token, else its eos token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
