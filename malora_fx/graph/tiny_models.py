"""Small random transformers models and a byte-level tokenizer, for smoke runs and unit tests.

``tiny-llama`` (a causal LM with grouped KV heads), ``tiny-gpt2`` (GPT-2's
``Conv1D`` projections) and ``tiny-bert`` (an encoder): hidden size 64, two
layers, seeded, identical on every call, no download.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelSourceError

TINY = ("tiny-llama", "tiny-gpt2", "tiny-bert")
TINY_VOCAB = 258  # the byte-level tiny tokenizer: 256 bytes + <pad> + <eos>


def tiny_tokenizer():
    """A byte-level tokenizer for the tiny models: 256 byte tokens, ``<pad>`` = 256,
    ``<eos>`` = 257, no chat template. Any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<pad>": 256, "<eos>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def tiny_model(name: str) -> nn.Module:
    """A small random transformers model, identical on every call (seed 0)."""
    import transformers

    config: transformers.PretrainedConfig
    model: nn.Module
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "tiny-llama":
            config = transformers.LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=TINY_VOCAB,
                max_position_embeddings=256,
                tie_word_embeddings=False,
            )
            model = transformers.LlamaForCausalLM(config)
        elif name == "tiny-gpt2":
            config = transformers.GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=TINY_VOCAB,
                n_positions=256,
                bos_token_id=257,
                eos_token_id=257,
            )
            model = transformers.GPT2LMHeadModel(config)
        elif name == "tiny-bert":
            config = transformers.BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=TINY_VOCAB,
                max_position_embeddings=256,
            )
            model = transformers.BertModel(config)
        else:
            raise ModelSourceError(f"unknown tiny model {name!r}; allowed: {', '.join(TINY)}")
    return model.eval()
