"""Greedy decoding with a KV cache: token for token the same as the no-cache path."""

import functools
import json

import pytest
import torch
from conftest import randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.adapters.run_dir import load_run
from malora_fx.cli import main
from malora_fx.graph.tiny_models import tiny_tokenizer
from malora_fx.training.data import Example
from malora_fx.training.eval_decoder import CachedDecoder, cached_decoder, load_run_for_eval
from malora_fx.training.evaluate import evaluate, greedy_generate, greedy_generate_cached
from malora_fx.training.suites import write_suite

# different lengths in one batch: the short ones get a padding gap before their generated tokens
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [3], [40, 41, 42, 43, 44], [70, 71]]


@functools.cache
def _adapted(name: str, method: str, seed: int = 1):
    """(base model, adapted graph, its cached decoder), built once per module run (captures are slow)."""
    model, kwargs = tiny(name)
    gm = mf.transform(model, small_config(method), kwargs)
    randomize_adapters(gm, std=0.3, seed=seed)  # B != 0: the adapters change the tokens
    mf.set_adapters_training(gm, False)
    return model, gm, cached_decoder(model, gm)


def _logits_fn(module, **extra):
    return lambda ids, mask: module(input_ids=ids, attention_mask=mask, **extra).logits


def _both(logits_fn, decoder, prompts=PROMPTS, **options):
    options = {"max_new_tokens": 24, "stop_ids": set(), "pad_id": 256, **options}
    return greedy_generate(logits_fn, prompts, **options), greedy_generate_cached(decoder, prompts, **options)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_cached_equals_uncached_on_the_base_model(name):
    model, _ = tiny(name)
    model.eval()
    decoder = cached_decoder(model)
    assert isinstance(decoder, CachedDecoder)
    old, new = _both(_logits_fn(model, use_cache=False), decoder)
    assert new == old
    assert all(len(tokens) == 24 for tokens in new)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["malora", "lora", "molora", "hydralora"])
def test_cached_equals_uncached_on_an_adapted_graph(name, method):
    model, gm, decoder = _adapted(name, method)
    old, new = _both(_logits_fn(gm), decoder)
    assert new == old
    base, _ = _both(_logits_fn(model, use_cache=False), cached_decoder(model))
    assert base != new  # the adapters matter, so the comparison above could fail


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_rows_stop_at_their_own_stop_token(name):
    _, gm, decoder = _adapted(name, "malora")
    free, _ = _both(_logits_fn(gm), decoder)
    stops = {free[0][3], free[2][1]}  # rows 0 and 2 stop early, at different steps; others may too
    old, new = _both(_logits_fn(gm), decoder, stop_ids=stops)
    assert new == old
    assert len(new[0]) <= 3 and len(new[2]) <= 1 and not stops & {t for row in new for t in row}
    assert any(len(row) > 3 for row in new)  # and the rest of the batch goes on without them


def test_batched_rows_equal_each_row_alone():
    decoder = _adapted("tiny-llama", "malora")[2]
    batched = greedy_generate_cached(decoder, PROMPTS, max_new_tokens=10, stop_ids=set(), pad_id=256)
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert greedy_generate_cached(decoder, [prompt], max_new_tokens=10, stop_ids=set(), pad_id=256) == [got]


def test_decoding_feeds_one_token_per_row_after_the_prefill():
    decoder = _adapted("tiny-llama", "lora")[2]
    widths = []

    def counting(ids, mask, positions, past):
        widths.append((tuple(ids.shape), mask.shape[1], positions[:, -1].tolist()))
        return decoder(ids, mask, positions, past)

    greedy_generate_cached(counting, [[1, 2, 3], [4]], max_new_tokens=3, stop_ids=set(), pad_id=256)
    assert widths == [((2, 3), 3, [2, 2]), ((2, 1), 4, [3, 1]), ((2, 1), 5, [4, 2])]


def test_limits_and_empty_input_match_the_old_path():
    model, _ = tiny("tiny-llama")
    decoder = cached_decoder(model.eval())
    for max_new_tokens in (0, 1, 2):
        old, new = _both(_logits_fn(model, use_cache=False), decoder, max_new_tokens=max_new_tokens)
        assert new == old and all(len(t) == max_new_tokens for t in new)
    assert greedy_generate_cached(decoder, [], max_new_tokens=3, stop_ids=set(), pad_id=256) == []


def test_an_encoder_has_no_cached_decoder():
    model, kwargs = tiny("tiny-bert")
    assert cached_decoder(model) is None
    assert cached_decoder(model, mf.transform(model, small_config("lora"), kwargs)) is None


def test_cached_decoder_refuses_a_graph_of_another_model():
    import transformers

    model, gm, _ = _adapted("tiny-llama", "lora")
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 1})
    one_layer = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="differ in sites"):
        cached_decoder(one_layer, gm)


def test_evaluate_with_a_decoder_equals_without():
    _, gm, decoder = _adapted("tiny-llama", "hydralora")
    tok = tiny_tokenizer()
    rows = [("a", "abc", "xy"), ("a", "hello there", "z"), ("b", "q", "long answer"), ("b", "", "")]
    examples = [Example(task, (("user", f"{task} {text}"), ("assistant", answer))) for task, text, answer in rows]
    options = dict(max_length=64, batch_size=3, max_new_tokens=8)
    old = evaluate(_logits_fn(gm), tok, examples, **options)
    new = evaluate(_logits_fn(gm), tok, examples, decoder=decoder, **options)
    assert new == old


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-cached")
    write_suite("intra", root / "data", train=2, eval=3, seed=0)
    assert main(["transform", "tiny-llama", "--out", str(root / "plain"), "--targets", "q_proj,v_proj"]) == 0
    gm, _ = load_run(root / "plain")
    randomize_adapters(gm, std=0.3, seed=5)
    mf.save_adapters(gm, root / "run", base_model="tiny-llama")
    return root


def test_eval_cli_no_cache_gives_the_same_results(random_run, capsys):
    argv = ["eval", str(random_run / "run"), "--data", str(random_run / "data" / "eval.jsonl"), "--base", "--json"]
    results = {}
    for flag in ([], ["--no-cache"]):
        capsys.readouterr()
        assert main([*argv, "--max-new-tokens", "6", "--batch-size", "4", *flag]) == 0
        results[bool(flag)] = json.loads(capsys.readouterr().out)
    assert results[True] == results[False]
    assert results[False]["adapted"] != results[False]["base"]


def test_cached_decoder_moves_with_its_model():
    decoder = _adapted("tiny-llama", "malora")[2]
    assert decoder is not None and decoder.to("cpu") is decoder
    logits, past = decoder(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[0, 1]]), None)
    assert logits.shape == (1, 2, 258) and len(past) == 2
    assert past[0][0].shape == (1, 2, max(2, decoder.min_length), 16)  # a masked zero prefix up to min_length


def test_decoder_logits_equal_the_plain_graph_on_padded_rows():
    _, gm, decoder = _adapted("tiny-llama", "malora")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 256, 256, 256, 256]])
    mask = (ids != 256).long()
    expected = gm(input_ids=ids, attention_mask=mask).logits
    got = decoder.logits(ids, mask)
    assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1, :2], expected[1, :2], atol=1e-5)


def test_a_run_directory_gives_the_same_decoder_as_its_graph(random_run):
    gm, loaded = load_run(random_run / "run")
    from_dir, from_graph = cached_decoder(loaded.model, random_run / "run"), cached_decoder(loaded.model, gm)
    tokens = [
        greedy_generate_cached(d, PROMPTS, max_new_tokens=8, stop_ids=set(), pad_id=256) for d in (from_dir, from_graph)
    ]
    assert tokens[0] == tokens[1]
    logits_fn, decoder, _ = load_run_for_eval(random_run / "run")
    assert decoder is not None and logits_fn == decoder.logits
    plain_fn, none, _ = load_run_for_eval(random_run / "run", use_cache=False)
    assert none is None
    assert greedy_generate(plain_fn, PROMPTS, max_new_tokens=8, stop_ids=set(), pad_id=256) == tokens[0]
