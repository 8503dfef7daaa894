"""Data files, tokenisation with response-only labels, task sampling and batching."""

import json

import pytest
import torch

from malora_fx.errors import MaloraError
from malora_fx.graph.tiny_models import tiny_tokenizer
from malora_fx.training.data import (
    IGNORE,
    DataError,
    Example,
    collate,
    encode,
    encode_all,
    parse_sampling,
    plan_batches,
    read_jsonl,
    task_probabilities,
)


def _write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_both_formats(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"task": "a", "prompt": "p", "response": "r"}),
            "",
            json.dumps(
                {
                    "task": "b",
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "ans"},
                    ],
                }
            ),
        ],
    )
    a, b = read_jsonl(path)
    assert (a.task, a.prompt, a.response) == ("a", "p", "r")
    assert (b.task, b.prompt, b.response, len(b.messages)) == ("b", "q", "ans", 3)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"task": "a", "prompt": "p"', "d.jsonl:2: not valid JSON"),
        ('["a"]', "d.jsonl:2: expected a JSON object, got list"),
        ('{"prompt": "p", "response": "r"}', 'd.jsonl:2: "task" must be a non-empty string'),
        ('{"task": "a", "prompt": 3, "response": "r"}', 'd.jsonl:2: "prompt" must be a string'),
        ('{"task": "a", "messages": [{"role": "user", "content": "q"}]}', "d.jsonl:2: the last message must be"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"task": "a", "prompt": "p", "response": "r"}), line])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_empty_file(tmp_path):
    path = _write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="empty data file"):
        read_jsonl(path)


def test_labels_cover_the_response_only_and_truncation_is_counted():
    tok = tiny_tokenizer()
    example = Example("t", (("user", "reverse abc"), ("assistant", "cba")))
    enc = encode(example, tok, max_length=64)
    prompt_len = len("reverse abc\n")
    assert enc.prompt_length == prompt_len
    assert enc.labels[:prompt_len] == (IGNORE,) * prompt_len
    assert tok.decode(list(enc.labels[prompt_len:])) == "cba<eos>"
    assert enc.input_ids[prompt_len:] == enc.labels[prompt_len:]
    encoded, truncated = encode_all([example, Example("t", (("user", "x" * 100), ("assistant", "y")))], tok, 32)
    assert truncated == 1 and len(encoded[1].input_ids) == 32


def test_chat_template_masks_the_prompt(smollm2):
    tok = smollm2.tokenizer
    enc = encode(Example("t", (("user", "What is 2+2?"), ("assistant", "4"))), tok, 512)
    response = tok.decode([t for t in enc.labels if t != IGNORE])
    assert response.startswith("4") and "<|im_end|>" in response
    assert "What is 2+2?" in tok.decode(enc.input_ids[: enc.prompt_length])


def test_sampling_modes():
    tasks = ["a"] * 9 + ["b"]
    assert task_probabilities(tasks, "proportional") == pytest.approx({"a": 0.9, "b": 0.1})
    assert task_probabilities(tasks, "uniform") == pytest.approx({"a": 0.5, "b": 0.5})
    assert task_probabilities(tasks, "temperature:2") == pytest.approx({"a": 0.75, "b": 0.25})
    for bad in ("random", "temperature:0", "temperature:-1", "temperature:"):
        with pytest.raises(MaloraError, match=f"task sampling: unknown mode '{bad}'"):
            parse_sampling(bad)


def _toy_encoded(n_a=30, n_b=10):
    tok = tiny_tokenizer()
    examples = [Example("a", (("user", "a" * (i % 7 + 1)), ("assistant", "x"))) for i in range(n_a)]
    examples += [Example("b", (("user", "b" * (i % 5 + 1)), ("assistant", "y"))) for i in range(n_b)]
    return encode_all(examples, tok, 64)[0]


def test_schedule_is_deterministic_and_follows_sampling():
    enc = _toy_encoded()
    first = plan_batches(enc, batch_size=4, num_batches=50, sampling="uniform", seed=3)
    assert first == plan_batches(enc, batch_size=4, num_batches=50, sampling="uniform", seed=3)
    assert first != plan_batches(enc, batch_size=4, num_batches=50, sampling="uniform", seed=4)
    assert len(first) == 50 and all(len(b) == 4 for b in first)
    share_b = sum(enc[i].task == "b" for b in first for i in b) / 200
    assert 0.4 < share_b < 0.6
    prop = plan_batches(enc, batch_size=4, num_batches=50, sampling="proportional", seed=3)
    assert 0.15 < sum(enc[i].task == "b" for b in prop for i in b) / 200 < 0.35  # 10 of 40 examples


def test_length_grouping_reduces_padding():
    enc = _toy_encoded()
    grouped = plan_batches(enc, batch_size=4, num_batches=40, sampling="proportional", seed=0)
    ungrouped = plan_batches(enc, batch_size=4, num_batches=40, sampling="proportional", seed=0, group_size=1)

    def pad(batches):
        return sum(
            max(len(enc[i].input_ids) for i in b) * len(b) - sum(len(enc[i].input_ids) for i in b) for b in batches
        )

    assert pad(grouped) < pad(ungrouped) / 2


def test_collate_right_pads():
    enc = _toy_encoded(2, 0)
    batch = collate(enc, pad_id=256)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(enc[0].input_ids)
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE)
