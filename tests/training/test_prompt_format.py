"""One prompt format for training, evaluation, `malora-fx run`, the quickstart and the routing report: the
tokenizer's own special tokens (BOS once, never twice), the chat template when there is one."""

import pytest
import torch
from conftest import randomize_adapters, small_config, tiny
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import malora_fx as mf
from malora_fx import quickstart
from malora_fx.cli import main
from malora_fx.deploy import runner
from malora_fx.graph.tiny_models import tiny_tokenizer
from malora_fx.training import routing_report
from malora_fx.training.data import IGNORE, Example, encode, format_prompt
from malora_fx.training.evaluate import exact_match

BOS, EOS = 256, 257  # inside the tiny models' vocabulary of 258
TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TEMPLATE_WITHOUT_BOS = TEMPLATE_WITH_BOS.removeprefix("{{ bos_token }}")


def byte_tokenizer(post: str | None = "bos", template: str | None = None):
    """Byte-level: 256 byte tokens, ``<bos>`` = 256, ``<eos>`` = 257 (also padding).

    ``post="bos"``: the tokenizer adds BOS (``add_bos_token``, like LLaMA's); ``"eos"``: it appends EOS;
    ``None``: it adds nothing."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<bos>": BOS, "<eos>": EOS})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if post == "bos":
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
        )
    elif post == "eos":
        backend.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", EOS)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<eos>",
        add_bos_token=post == "bos",
        add_eos_token=post == "eos",
    )
    if template:
        tok.chat_template = template
    return tok


def text_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


TOKENIZERS = {
    "adds-bos-no-template": lambda: byte_tokenizer("bos"),
    "adds-bos-template-writes-bos": lambda: byte_tokenizer("bos", TEMPLATE_WITH_BOS),
    "adds-bos-template-without-bos": lambda: byte_tokenizer("bos", TEMPLATE_WITHOUT_BOS),
    "adds-eos-no-template": lambda: byte_tokenizer("eos"),
    "adds-nothing": tiny_tokenizer,
}


def test_tokenizer_fixture_adds_bos():
    tok = byte_tokenizer("bos")
    assert tok("ab")["input_ids"] == [BOS, *text_ids(tok, "ab")]
    assert tok("<bos>ab")["input_ids"][:2] == [BOS, BOS]  # what a template with BOS would get without care


def test_bos_tokenizer_without_template():
    tok = byte_tokenizer("bos")
    assert format_prompt(tok, "abc") == [BOS, *text_ids(tok, "abc\n")]
    enc = encode(Example("t", (("user", "abc"), ("assistant", "xy"))), tok, 64)
    prompt = [BOS, *text_ids(tok, "abc\n")]
    assert list(enc.input_ids) == prompt + text_ids(tok, "xy") + [EOS]
    assert list(enc.labels) == [IGNORE] * len(prompt) + text_ids(tok, "xy") + [EOS]
    assert enc.prompt_length == len(prompt) and enc.input_ids.count(BOS) == 1


def test_template_that_writes_bos_gets_it_once():
    tok = byte_tokenizer("bos", TEMPLATE_WITH_BOS)
    ids = format_prompt(tok, "hi")
    assert ids == [BOS, *text_ids(tok, "<user>hi"), EOS, *text_ids(tok, "<assistant>")]
    enc = encode(Example("t", (("user", "hi"), ("assistant", "xy"))), tok, 64)
    assert enc.input_ids.count(BOS) == 1 and list(enc.input_ids[: enc.prompt_length]) == ids
    assert list(enc.input_ids[enc.prompt_length :]) == text_ids(tok, "xy") + [EOS]  # the template's end of turn
    assert list(enc.labels[enc.prompt_length :]) == text_ids(tok, "xy") + [EOS]


def test_template_without_bos_gets_the_tokenizers_bos():
    tok = byte_tokenizer("bos", TEMPLATE_WITHOUT_BOS)
    assert format_prompt(tok, "hi") == [BOS, *text_ids(tok, "<user>hi"), EOS, *text_ids(tok, "<assistant>")]


def test_appended_eos_ends_the_response_not_the_prompt():
    tok = byte_tokenizer("eos")
    assert tok("ab")["input_ids"][-1] == EOS
    assert format_prompt(tok, "abc") == text_ids(tok, "abc\n")
    enc = encode(Example("t", (("user", "abc"), ("assistant", "xy"))), tok, 64)
    assert list(enc.input_ids) == text_ids(tok, "abc\nxy") + [EOS]


def test_tokenizer_that_adds_nothing_is_unchanged():
    tok = tiny_tokenizer()
    assert format_prompt(tok, "abc") == text_ids(tok, "abc\n")
    assert format_prompt(tok, "abc", raw=True) == text_ids(tok, "abc")
    assert format_prompt(byte_tokenizer("bos", TEMPLATE_WITH_BOS), "abc", raw=True) == [BOS, *text_ids(tok, "abc")]


class _FakeGenerator:
    """Stands in for OrtGenerator: records the prompt ids it is asked to continue."""

    seen: list[list[int]] = []

    def __init__(self, tok):
        self.tokenizer, self.provider, self.io_binding = tok, "CPUExecutionProvider", False

    def generate(self, prompt_ids, **kwargs):
        _FakeGenerator.seen.append(list(prompt_ids))
        yield from text_ids(self.tokenizer, "ok")


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_train_eval_run_quickstart_and_routing_feed_the_same_ids(name, monkeypatch, capsys):
    tok = TOKENIZERS[name]()
    prompt, example = "say ok", Example("t", (("user", "say ok"), ("assistant", "ok")))
    expected = format_prompt(tok, prompt)
    assert expected.count(BOS) == (0 if name.startswith("adds-eos") or name == "adds-nothing" else 1)

    enc = encode(example, tok, 64)  # training (train() encodes every example with encode)
    assert list(enc.input_ids[: enc.prompt_length]) == expected

    evaluated: list[list[int]] = []

    def logits_fn(ids, mask):  # evaluation's greedy decoding: record the first prompt it sees
        if not evaluated:
            evaluated.append(ids[0, : int(mask[0].sum())].tolist())
        return torch.zeros(*ids.shape, 258)

    exact_match(logits_fn, tok, [example], max_length=64, batch_size=1, max_new_tokens=1)
    assert evaluated == [expected]

    _FakeGenerator.seen = []
    monkeypatch.setattr(runner, "OrtGenerator", lambda export_dir, provider, io_binding=None: _FakeGenerator(tok))
    assert main(["run", "unused-export", "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == "ok\n"
    assert quickstart._generate(_FakeGenerator(tok), prompt) == "ok"  # type: ignore[arg-type]
    assert _FakeGenerator.seen == [expected, expected]

    model, kwargs = tiny("tiny-llama")
    gm = mf.transform(model, small_config("malora", targets="q_proj"), kwargs)
    randomize_adapters(gm, std=0.3)
    routed: list[list[int]] = []
    real_collate = routing_report.collate
    monkeypatch.setattr(
        routing_report,
        "collate",
        lambda items, pad: routed.extend(list(e.input_ids) for e in items) or real_collate(items, pad),
    )
    routing_report.expert_load(gm, tok, [example])
    assert routed == [list(enc.input_ids)] and routed[0][: len(expected)] == expected
