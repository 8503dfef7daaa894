"""Offline multi-task suites for fine-tuning experiments, with exact-match answers.

Contract:

* ``SUITES`` maps a suite name to its task names. ``"inter"`` holds tasks from
  different domains (arithmetic, strings, lists, dates, geography, sentiment);
  ``"intra"`` holds closely related string-manipulation tasks.
* ``make_suite(suite, train=, eval=, seed=)`` returns ``(train_examples,
  eval_examples)``. Each example is ``{"task", "prompt", "response"}``. The
  counts are per task. No prompt appears twice in a suite, so train and eval
  prompts never overlap. The output depends only on the arguments: every task
  draws from its own ``random.Random`` seeded from ``sha256(seed, suite,
  task)``. The global RNG and ``hash()`` are never used. Eval examples are
  drawn before train examples and keep task order, so for one seed the eval set
  stays the same whatever ``train`` is. Train examples are shuffled.
* ``write_suite(suite, out_dir, ...)`` writes ``train.jsonl`` and
  ``eval.jsonl`` (one JSON object per line, UTF-8) by writing each to a
  temporary file and moving it into place, and returns their paths.
* ``check_answer(expected, generated)`` is exact match on the first line of
  the generated text, ignoring surrounding whitespace and anything after an
  end-of-text marker.

Every generator is ``gen_<task>(rng) -> (prompt, response)``. Answers are
short (a number, a word, a code) so a small model can learn them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from ..errors import MaloraError
from ..fileio import atomic_write
from .suite_vocabulary import (
    ADVERBS,
    CODA,
    COMMON_WORDS,
    CONSONANTS,
    COUNTRY_CURRENCIES,
    COUNTRY_NAMES,
    CURRENCY_TEMPLATES,
    FIRST_DAY,
    ITEMS,
    LAST_DAY,
    NAMES,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    REVIEW_SUBJECTS,
    VOWELS,
    WEEKDAYS,
)

Example = dict[str, str]
Generator = Callable[[random.Random], tuple[str, str]]


# --------------------------------------------------------------------------- helpers


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable two-syllable lowercase word such as ``talim`` (4-6 letters)."""
    parts = []
    for _ in range(2):
        parts.append(rng.choice(CONSONANTS) + rng.choice(VOWELS))
        if rng.random() < 0.3:
            parts.append(rng.choice(CODA))
    return "".join(parts)


def _phrase(rng: random.Random, low: int, high: int) -> str:
    """``low``..``high`` distinct common words joined by spaces."""
    return " ".join(rng.sample(COMMON_WORDS, rng.randint(low, high)))


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------- generators


def gen_arithmetic(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("add", "subtract", "multiply"))
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", str(a + b)
    if kind == "subtract":
        a = rng.randint(3, 20)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", str(a - b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{name} has {a} boxes with {b} {item} each. How many {item} are there in total?", str(a * b)


def gen_reverse(rng: random.Random) -> tuple[str, str]:
    word = _pseudo_word(rng)
    return f"Reverse the letters of this word: {word}", word[::-1]


def gen_sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 10), rng.randint(3, 5))  # digits keep the answer under ~13 tokens
    shown = ", ".join(map(str, numbers))
    return f"Sort these numbers in ascending order: {shown}", ", ".join(map(str, sorted(numbers)))


def gen_weekday(rng: random.Random) -> tuple[str, str]:
    day = dt.date.fromordinal(rng.randint(FIRST_DAY.toordinal(), LAST_DAY.toordinal()))
    return f"What day of the week is {day.isoformat()}?", WEEKDAYS[day.weekday()]


def gen_currency(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(COUNTRY_NAMES)
    return rng.choice(CURRENCY_TEMPLATES).format(country), COUNTRY_CURRENCIES[country]


def gen_sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(("positive", "negative"))
    adjective = rng.choice(POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS)
    subject = rng.choice(REVIEW_SUBJECTS)
    sentence = rng.choice(
        (
            f"{_capitalize(subject)} was {adjective}.",
            f"I thought {subject} was {adjective}.",
            f"Honestly, {subject} was {rng.choice(ADVERBS)} {adjective}.",
        )
    )
    return f"Is this review positive or negative? {sentence}", label


def gen_uppercase(rng: random.Random) -> tuple[str, str]:
    phrase = _phrase(rng, 2, 2)
    return f"Convert to uppercase: {phrase}", phrase.upper()


def gen_first_letters(rng: random.Random) -> tuple[str, str]:
    phrase = _phrase(rng, 3, 5)
    return f"Write the first letter of each word: {phrase}", "".join(w[0] for w in phrase.split())


def gen_count_vowels(rng: random.Random) -> tuple[str, str]:
    phrase = _phrase(rng, 2, 2)
    return f"Count the vowels (a, e, i, o, u) in: {phrase}", str(sum(c in VOWELS for c in phrase))


def gen_remove_vowels(rng: random.Random) -> tuple[str, str]:
    phrase = _phrase(rng, 2, 2)
    return f"Remove every vowel from: {phrase}", "".join(c for c in phrase if c not in VOWELS)


GENERATORS: dict[str, Generator] = {
    "arithmetic": gen_arithmetic,
    "reverse": gen_reverse,
    "sort": gen_sort,
    "weekday": gen_weekday,
    "currency": gen_currency,
    "sentiment": gen_sentiment,
    "uppercase": gen_uppercase,
    "first_letters": gen_first_letters,
    "count_vowels": gen_count_vowels,
    "remove_vowels": gen_remove_vowels,
}

SUITES: dict[str, tuple[str, ...]] = {
    "inter": ("arithmetic", "reverse", "sort", "weekday", "currency", "sentiment"),
    "intra": ("reverse", "uppercase", "first_letters", "count_vowels", "remove_vowels"),
}

# --------------------------------------------------------------------------- suites


def _derived_rng(seed: int, *labels: str) -> random.Random:
    """A ``random.Random`` seeded from sha256 of the seed and labels (stable across runs)."""
    digest = hashlib.sha256("\x1f".join((str(seed), *labels)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MaloraError(f"{name}: {value!r} is not allowed; expected an integer >= 1 (examples per task)")


def _draw(task: str, split: str, rng: random.Random, count: int, seen: set[str]) -> list[Example]:
    """``count`` examples of ``task`` whose prompts are not in ``seen`` (which is updated)."""
    generate = GENERATORS[task]
    examples: list[Example] = []
    attempts, max_attempts = 0, 50 * count + 1000
    while len(examples) < count:
        if attempts >= max_attempts:
            raise MaloraError(
                f"task {task!r}: only {len(examples)} new distinct {split} prompts found after {attempts} "
                f"draws, {count} needed; the task's prompt space is exhausted, lower train/eval"
            )
        attempts += 1
        prompt, response = generate(rng)
        if prompt not in seen:
            seen.add(prompt)
            examples.append({"task": task, "prompt": prompt, "response": response})
    return examples


def make_suite(suite: str, *, train: int, eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """``(train_examples, eval_examples)`` with ``train`` and ``eval`` examples per task."""
    if suite not in SUITES:
        raise MaloraError(f"suite: unknown suite {suite!r}; allowed: {', '.join(SUITES)}")
    _check_count("train", train)
    _check_count("eval", eval)
    seen: set[str] = set()
    train_examples: list[Example] = []
    eval_examples: list[Example] = []
    for task in SUITES[suite]:
        rng = _derived_rng(seed, suite, task)
        eval_examples += _draw(task, "eval", rng, eval, seen)
        train_examples += _draw(task, "train", rng, train, seen)
    _derived_rng(seed, suite, "shuffle").shuffle(train_examples)
    return train_examples, eval_examples


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    """Write ``examples`` to a temporary file next to ``path`` and move it into place."""
    text = "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_suite(suite: str, out_dir: str | os.PathLike[str], *, train: int, eval: int, seed: int) -> dict[str, Path]:
    """Write ``out_dir/train.jsonl`` and ``out_dir/eval.jsonl``; return ``{"train": path, "eval": path}``."""
    splits = dict(zip(("train", "eval"), make_suite(suite, train=train, eval=eval, seed=seed), strict=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, examples in splits.items():
        paths[split] = out / f"{split}.jsonl"
        _write_jsonl(paths[split], examples)
    return paths


# --------------------------------------------------------------------------- scoring

END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>")


def check_answer(expected: str, generated: str) -> bool:
    """True if the first line of ``generated`` (cut at any end-of-text marker) equals ``expected``.

    Whitespace around both is ignored, so a leading space or newline before the
    answer does not count against it.
    """
    for marker in END_MARKERS:
        generated = generated.split(marker, 1)[0]
    lines = generated.strip().splitlines()
    return (lines[0].strip() if lines else "") == expected.strip()
