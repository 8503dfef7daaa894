"""Procedural multi-task suites: determinism, counts, disjoint splits, answers checked independently."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pycountry
import pytest

from malora_fx.errors import MaloraError
from malora_fx.training.suites import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SUITES,
    check_answer,
    make_suite,
    write_suite,
)

TRAIN, EVAL = 200, 30


@pytest.fixture(scope="module", params=sorted(SUITES))
def suite_data(request):
    suite = request.param
    train, eval_ = make_suite(suite, train=TRAIN, eval=EVAL, seed=7)
    return suite, train, eval_


# --------------------------------------------------------------------------- structure


def test_suites_have_enough_distinct_tasks():
    assert len(set(SUITES["inter"])) >= 6
    assert len(set(SUITES["intra"])) >= 4


def test_same_seed_same_output_different_seed_different_output():
    for suite in SUITES:
        first = make_suite(suite, train=20, eval=5, seed=3)
        assert make_suite(suite, train=20, eval=5, seed=3) == first
        other = make_suite(suite, train=20, eval=5, seed=4)
        assert other[0] != first[0] and other[1] != first[1]


def test_output_does_not_depend_on_hash_randomization():
    code = (
        "import json; from malora_fx.training.suites import make_suite; "
        "print(json.dumps(make_suite('inter', train=5, eval=2, seed=11)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert json.loads(outputs.pop()) == json.loads(json.dumps(make_suite("inter", train=5, eval=2, seed=11)))


def test_eval_set_does_not_depend_on_train_count():
    _, eval_small = make_suite("intra", train=10, eval=8, seed=5)
    _, eval_large = make_suite("intra", train=300, eval=8, seed=5)
    assert eval_small == eval_large


def test_counts_per_task_and_example_shape(suite_data):
    suite, train, eval_ = suite_data
    assert Counter(e["task"] for e in train) == {task: TRAIN for task in SUITES[suite]}
    assert Counter(e["task"] for e in eval_) == {task: EVAL for task in SUITES[suite]}
    for example in train + eval_:
        assert set(example) == {"task", "prompt", "response"}
        assert all(isinstance(v, str) and v.strip() == v and v for v in example.values())
        assert len(example["prompt"].split()) <= 25
        assert len(example["response"].split()) <= 6 and len(example["response"]) <= 20


def test_no_duplicate_prompts_and_no_train_eval_overlap(suite_data):
    _, train, eval_ = suite_data
    train_prompts = [e["prompt"] for e in train]
    eval_prompts = [e["prompt"] for e in eval_]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)


def test_large_counts_are_possible():
    for suite in SUITES:
        train, eval_ = make_suite(suite, train=500, eval=50, seed=0)
        assert len(train) == 500 * len(SUITES[suite]) and len(eval_) == 50 * len(SUITES[suite])


def test_train_examples_are_shuffled_across_tasks():
    train, _ = make_suite("inter", train=50, eval=1, seed=0)
    assert [e["task"] for e in train[:50]] != [train[0]["task"]] * 50


# --------------------------------------------------------------------------- independent answer checks

WEEKDAY_NAMES = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
EUROZONE = {
    "AT",
    "BE",
    "CY",
    "DE",
    "EE",
    "ES",
    "FI",
    "FR",
    "GR",
    "HR",
    "IE",
    "IT",
    "LT",
    "LU",
    "LV",
    "MT",
    "NL",
    "PT",
    "SI",
    "SK",
}
DOLLARIZED = {"EC", "SV", "PA", "TL"}
COUNTRY_ALIASES = {"Russia": "RU", "Turkey": "TR"}
KNOWN_CODES = {
    "Japan": "JPY",
    "the United States": "USD",
    "the United Kingdom": "GBP",
    "Germany": "EUR",
    "Switzerland": "CHF",
    "India": "INR",
    "China": "CNY",
    "Brazil": "BRL",
}
SURE_POSITIVE = {"wonderful", "great", "excellent", "amazing", "lovely"}
SURE_NEGATIVE = {"terrible", "awful", "horrible", "boring", "disappointing"}


def _after_colon(prompt: str) -> str:
    return prompt.split(": ", 1)[1]


def _arithmetic(prompt: str) -> str:
    if m := re.search(r"has (\d+) (\w+) and buys (\d+) more\. How many \2 ", prompt):
        return str(int(m[1]) + int(m[3]))
    if m := re.search(r"has (\d+) (\w+) and gives away (\d+)\. How many \2 ", prompt):
        return str(int(m[1]) - int(m[3]))
    m = re.search(r"has (\d+) boxes with (\d+) (\w+) each\. How many \3 ", prompt)
    assert m, prompt
    return str(int(m[1]) * int(m[2]))


def _reverse(prompt: str) -> str:
    word = _after_colon(prompt)
    assert re.fullmatch(r"[a-z]{3,8}", word), prompt
    return "".join(word[i] for i in range(len(word) - 1, -1, -1))


def _sort(prompt: str) -> str:
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    assert 3 <= len(numbers) <= 5, prompt
    return ", ".join(str(n) for n in sorted(numbers))


def _weekday(prompt: str) -> str:
    day = dt.date.fromisoformat(re.search(r"\d{4}-\d{2}-\d{2}", prompt)[0])
    assert 1950 <= day.year <= 2050
    return WEEKDAY_NAMES[day.weekday()]


def _country(prompt: str) -> str:
    return re.fullmatch(r".* (?:of|in|for|by) (.+)[?.]", prompt)[1]


def _currency_is_plausible(prompt: str, code: str) -> bool:
    name = _country(prompt)
    if name in KNOWN_CODES:
        return KNOWN_CODES[name] == code
    bare = name.removeprefix("the ")
    alpha_2 = COUNTRY_ALIASES.get(bare) or pycountry.countries.lookup(bare).alpha_2
    if pycountry.currencies.get(alpha_3=code) is None:
        return False
    # ISO 4217: a national currency's code starts with the country's alpha-2 code.
    return code[:2] == alpha_2 or (code == "EUR" and alpha_2 in EUROZONE) or (code == "USD" and alpha_2 in DOLLARIZED)


def _sentiment(prompt: str) -> str:
    word = re.search(r"(\w+)\.$", prompt)[1]
    if word in SURE_POSITIVE:
        return "positive"
    if word in SURE_NEGATIVE:
        return "negative"
    assert (word in POSITIVE_WORDS) != (word in NEGATIVE_WORDS), word
    return "positive" if word in POSITIVE_WORDS else "negative"


def _uppercase(prompt: str) -> str:
    return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in _after_colon(prompt))


def _first_letters(prompt: str) -> str:
    words = _after_colon(prompt).split(" ")
    assert 3 <= len(words) <= 5
    return "".join(w[0] for w in words)


def _count_vowels(prompt: str) -> str:
    return str(len(re.findall("[aeiou]", _after_colon(prompt))))


def _remove_vowels(prompt: str) -> str:
    return re.sub("[aeiou]", "", _after_colon(prompt))


SOLVERS = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "weekday": _weekday,
    "sentiment": _sentiment,
    "uppercase": _uppercase,
    "first_letters": _first_letters,
    "count_vowels": _count_vowels,
    "remove_vowels": _remove_vowels,
}


def test_every_task_has_an_independent_check():
    assert set(SOLVERS) | {"currency"} >= {task for tasks in SUITES.values() for task in tasks}


def test_answers_are_correct(suite_data):
    _, train, eval_ = suite_data
    for example in train + eval_:
        task, prompt, response = example["task"], example["prompt"], example["response"]
        if task == "currency":
            assert _currency_is_plausible(prompt, response), example
        else:
            assert SOLVERS[task](prompt) == response, example


def test_answers_are_varied(suite_data):
    _, train, _ = suite_data
    by_task: dict[str, set[str]] = {}
    for example in train:
        by_task.setdefault(example["task"], set()).add(example["response"])
    for task, responses in by_task.items():
        assert len(responses) >= 2, task
    if "sentiment" in by_task:
        assert by_task["sentiment"] == {"positive", "negative"}


def test_sentiment_word_lists_are_disjoint():
    assert not set(POSITIVE_WORDS) & set(NEGATIVE_WORDS)


# --------------------------------------------------------------------------- check_answer


@pytest.mark.parametrize(
    "expected, generated, ok",
    [
        ("12", "12", True),
        ("12", " 12 \n", True),
        ("12", "12\nQuestion: what is 3 + 4?", True),
        ("12", "12<|endoftext|>Tom has", True),
        ("12", "12</s>", True),
        ("12", "\n12\nmore", True),
        (" Monday ", "Monday", True),
        ("2, 5, 9", "2, 5, 9\n", True),
        ("12", "123", False),
        ("12", "1 2", False),
        ("12", "The answer is 12", False),
        ("12", "", False),
        ("12", "<|endoftext|>12", False),
        ("Monday", "monday", False),
        ("2, 5, 9", "2,5,9", False),
    ],
)
def test_check_answer(expected, generated, ok):
    assert check_answer(expected, generated) is ok


# --------------------------------------------------------------------------- write_suite


def test_write_suite_writes_jsonl(tmp_path):
    out = tmp_path / "nested" / "data"
    paths = write_suite("inter", out, train=12, eval=3, seed=1)
    assert paths == {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "train.jsonl"]
    expected = dict(zip(("train", "eval"), make_suite("inter", train=12, eval=3, seed=1), strict=True))
    for split, per_task in (("train", 12), ("eval", 3)):
        text = paths[split].read_text(encoding="utf-8")
        assert text.endswith("\n")
        lines = text.splitlines()
        assert len(lines) == per_task * len(SUITES["inter"])
        assert [json.loads(line) for line in lines] == expected[split]


def test_write_suite_overwrites(tmp_path):
    write_suite("intra", tmp_path, train=5, eval=2, seed=1)
    paths = write_suite("intra", tmp_path, train=3, eval=1, seed=2)
    assert len(paths["train"].read_text().splitlines()) == 3 * len(SUITES["intra"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "train.jsonl"]


def test_write_suite_bad_input_writes_nothing(tmp_path):
    with pytest.raises(MaloraError):
        write_suite("nope", tmp_path / "out", train=5, eval=2, seed=1)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- errors


def test_unknown_suite():
    with pytest.raises(MaloraError) as info:
        make_suite("cross", train=5, eval=2, seed=0)
    assert str(info.value) == "suite: unknown suite 'cross'; allowed: inter, intra"


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"train": 0}, "train: 0"),
        ({"eval": 0}, "eval: 0"),
        ({"train": -3}, "train: -3"),
        ({"eval": 2.5}, "eval: 2.5"),
    ],
)
def test_bad_counts(changes, name):
    kwargs = {"train": 5, "eval": 2, "seed": 0, **changes}
    with pytest.raises(MaloraError) as info:
        make_suite("inter", **kwargs)
    assert str(info.value).startswith(name)
    assert "expected an integer >= 1" in str(info.value)


def test_exhausted_prompt_space_is_a_clear_error():
    with pytest.raises(MaloraError, match=r"task 'currency'.*prompt space is exhausted"):
        make_suite("inter", train=5000, eval=10, seed=0)
