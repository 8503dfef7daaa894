"""Evaluation (loss, greedy exact match) and routing inspection."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.adapters.run_dir import load_run
from malora_fx.cli import main
from malora_fx.graph.tiny_models import tiny_tokenizer
from malora_fx.training.data import Example, read_jsonl
from malora_fx.training.evaluate import exact_match, greedy_generate, task_losses
from malora_fx.training.routing_report import expert_load
from malora_fx.training.suites import write_suite


def _logits_fn(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def test_batched_greedy_generation_equals_one_by_one():
    model, _ = tiny("tiny-llama")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]
    batched = greedy_generate(_logits_fn(model), prompts, max_new_tokens=6, stop_ids=set(), pad_id=256)
    for prompt, got in zip(prompts, batched, strict=True):
        ids = torch.tensor([prompt])
        expected = []
        for _ in range(6):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == expected


def test_generation_stops_at_stop_token():
    model, _ = tiny("tiny-llama")
    first = greedy_generate(_logits_fn(model), [[5, 6]], max_new_tokens=5, stop_ids=set(), pad_id=256)[0]
    stopped = greedy_generate(_logits_fn(model), [[5, 6]], max_new_tokens=5, stop_ids={first[2]}, pad_id=256)[0]
    assert stopped == first[: first.index(first[2])]


def test_task_loss_is_mean_response_cross_entropy():
    model, _ = tiny("tiny-llama")
    tok = tiny_tokenizer()
    examples = [Example("a", (("user", "abc"), ("assistant", "xy"))), Example("b", (("user", "q"), ("assistant", "z")))]
    losses = task_losses(_logits_fn(model), tok, examples, 64, 8)
    ids = tok("abc\nxy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = F.cross_entropy(logits[3:-1], torch.tensor(ids[4:])).item()  # predict "x", "y", <eos>
    assert losses["a"]["loss"] == pytest.approx(expected, rel=1e-5) and losses["a"]["tokens"] == 3


def test_exact_match_counts_a_model_that_knows_the_answer():
    tok = tiny_tokenizer()
    answer = tok("ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def oracle(ids, mask):  # always continues with "ok<eos>" after the prompt's newline
        logits = torch.zeros(*ids.shape, 258)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            text = ids[row, :n].tolist()
            after = text[text.index(198) + 1 :] if 198 in text else []
            logits[row, n - 1, answer[min(len(after), len(answer) - 1)]] = 1.0
        return logits

    examples = [
        Example("t", (("user", "say ok"), ("assistant", "ok"))),
        Example("t", (("user", "say no"), ("assistant", "no"))),
    ]
    assert exact_match(oracle, tok, examples, max_length=64, batch_size=2)["t"] == {"exact_match": 0.5, "n": 2}


def test_expert_load_rows_sum_to_top_k():
    model, batch = tiny("tiny-llama")
    gm = mf.transform(model, small_config("malora", targets="q_proj"), batch)
    randomize_adapters(gm, std=0.3)
    examples = [Example(t, (("user", f"{t} {i}"), ("assistant", "x"))) for t in ("a", "b") for i in range(3)]
    load = expert_load(gm, tiny_tokenizer(), examples, batch_size=2)
    assert set(load) == {"a", "b"} and set(load["a"]) == set(mf.adapter_layers(gm))
    for per_site in load.values():
        for row in per_site.values():
            assert sum(row) == pytest.approx(2.0) and len(row) == 4
    assert load["a"] != load["b"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_suite("intra", root / "data", train=2, eval=3, seed=0)
    assert main(["transform", "tiny-llama", "--out", str(root / "run"), "--targets", "q_proj,v_proj"]) == 0
    return root


def test_eval_cli_json_with_base(tiny_run, capsys, tmp_path):
    # random adapters, B included (B = 0 at init would make adapted equal base and the comparison empty)
    run = tmp_path / "random-run"
    gm, loaded = load_run(tiny_run / "run")
    randomize_adapters(gm, std=0.3, seed=5)
    mf.save_adapters(gm, run, base_model="tiny-llama")
    data = tiny_run / "data" / "eval.jsonl"
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--base", "--json", "--max-new-tokens", "4"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"adapted", "base"}
    tasks = {"reverse", "uppercase", "first_letters", "count_vowels", "remove_vowels", "average"}
    assert set(results["adapted"]) == tasks
    examples = read_jsonl(data)
    expected = {
        "adapted": task_losses(_logits_fn(gm), loaded.tokenizer, examples, 512, 16),
        "base": task_losses(_logits_fn(loaded.model), loaded.tokenizer, examples, 512, 16),
    }
    for task in tasks - {"average"}:
        for side in ("adapted", "base"):  # each column comes from its own model
            assert results[side][task]["loss"] == pytest.approx(expected[side][task]["loss"], rel=1e-5)
        assert abs(results["adapted"][task]["loss"] - results["base"][task]["loss"]) > 1e-3


def test_inspect_cli_writes_heatmap(tiny_run, capsys, tmp_path):
    plot = tmp_path / "routing.png"
    assert (
        main(["inspect", str(tiny_run / "run"), "--data", str(tiny_run / "data" / "eval.jsonl"), "--plot", str(plot)])
        == 0
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "reverse: 4 sites" in out


def test_inspect_lora_has_no_router(tiny_run, capsys, tmp_path):
    assert (
        main(["transform", "tiny-llama", "--out", str(tmp_path / "lora"), "--method", "lora", "--targets", "q_proj"])
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "lora"), "--data", str(tiny_run / "data" / "eval.jsonl")]) == 2
    assert "no router" in capsys.readouterr().err
