"""Latency of exported models in onnxruntime (and PyTorch eager), alternated.

``benchmark(variants, ...)`` times, for each variant, a prefill of a
``batch × seq`` prompt and ``new_tokens`` single-token decode steps with the
KV cache, cycling through the variants ``repeats`` times (A, B, C, A, B, C …)
so machine drift hits all alike; medians are reported with ratios to the
first variant (the base export).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# What `malora-fx bench` and the quickstart time by default: prompt length, decode steps, alternated rounds
BENCH_SEQ, BENCH_NEW_TOKENS, BENCH_REPEATS = 128, 32, 5

# A runner maps (input_ids, attention_mask, position_ids, past) -> (logits, past); past=None means empty.
Runner = Callable[[np.ndarray, np.ndarray, np.ndarray, object], tuple[np.ndarray, object]]


@dataclass
class Timing:
    prefill_s: list[float]
    decode_s: list[float]  # per token

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_s)

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_s)


def ort_runner(gen) -> Runner:
    """A runner over an :class:`malora_fx.deploy.runner.OrtGenerator` (its ``io_binding`` setting decides how
    the cache is kept: :mod:`malora_fx.deploy.kv_steps`)."""

    def run(ids, mask, positions, past):
        cache = gen.new_cache(ids.shape[0]) if past is None else past
        return cache(ids, mask, positions), cache

    return run


class GenaiTimer:
    """Times generation with a :class:`~malora_fx.deploy.genai_runner.GenaiGenerator` end to end.

    Prefill is ``append_tokens`` of the prompt; a decode step is one ``generate_next_token`` after the first
    (og samples the first token from the prefill's logits and runs the model for each later one), so it
    includes og's search and cache handling. Batch 1 only.
    """

    def __init__(self, gen) -> None:
        self.gen = gen

    def time_generation(self, batch: int, seq: int, new_tokens: int, vocab: int) -> tuple[float, float]:
        from ..errors import MaloraError

        if batch != 1:
            raise MaloraError(f"--batch: {batch}; onnxruntime-genai is timed at batch 1 only")
        ids = np.random.default_rng(0).integers(0, vocab, size=(seq,), dtype=np.int64)
        generator = self.gen.new_generator(seq + new_tokens + 1, 0.0, 1.0, 0, min_length=seq + new_tokens + 1)
        start = time.perf_counter()
        generator.append_tokens(ids.tolist())
        prefill = time.perf_counter() - start
        generator.generate_next_token()  # sampled from the prefill's logits: no model run
        start = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()
        return prefill, (time.perf_counter() - start) / max(new_tokens, 1)


def torch_runner(gm, layers: int, kv_heads: int, head_dim: int, dtype=torch.float32) -> Runner:
    """A runner over a captured decoder GraphModule (``malora_fx.graph.cached_decoder.capture_decoder``)."""

    @torch.no_grad()
    def run(ids, mask, positions, past):
        if past is None:
            empty = torch.zeros(ids.shape[0], kv_heads, 0, head_dim, dtype=dtype)
            past = tuple((empty, empty) for _ in range(layers))
        logits, present = gm(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            past_key_values=past,
        )
        return logits.numpy(), present

    return run


def time_once(run: Runner | GenaiTimer, batch: int, seq: int, new_tokens: int, vocab: int) -> tuple[float, float]:
    """(prefill seconds, mean decode seconds per token) of one generation."""
    if isinstance(run, GenaiTimer):
        return run.time_generation(batch, seq, new_tokens, vocab)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    start = time.perf_counter()
    logits, past = run(ids, np.ones((batch, seq), np.int64), np.tile(np.arange(seq), (batch, 1)), None)
    prefill = time.perf_counter() - start
    total = seq
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        logits, past = run(nxt, np.ones((batch, total + 1), np.int64), np.full((batch, 1), total, np.int64), past)
        total += 1
    return prefill, (time.perf_counter() - start) / max(new_tokens, 1)


def benchmark(
    variants: dict[str, Runner | GenaiTimer],
    *,
    batch: int = 1,
    seq: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    vocab: int = 1000,
    pause_s: float = 0.5,
) -> dict[str, Timing]:
    """Alternate the variants ``warmup + repeats`` times; keep the last ``repeats``.

    Each timing starts ``pause_s`` after the previous one ended: onnxruntime's
    and OpenMP's worker threads spin for a while after a run and would steal
    the cores from the next variant (measured: +20 ms on a 140 ms prefill).
    """
    timings = {name: Timing([], []) for name in variants}
    for round_ in range(warmup + repeats):
        for name, run in variants.items():
            time.sleep(pause_s)
            prefill, decode = time_once(run, batch, seq, new_tokens, vocab)
            if round_ >= warmup:
                timings[name].prefill_s.append(prefill)
                timings[name].decode_s.append(decode)
    return timings


def format_table(timings: dict[str, Timing], batch: int, seq: int) -> str:
    names = list(timings)
    ref = timings[names[0]]
    lines = [
        f"{'variant':<22} {'prefill ms':>11} {'vs ' + names[0]:>10} {'decode ms/tok':>14} {'vs ' + names[0]:>10}",
        f"{'(batch ' + str(batch) + ' x seq ' + str(seq) + ')':<22}",
    ]
    for name in names:
        t = timings[name]
        lines.append(
            f"{name:<22} {t.prefill * 1e3:>11.2f} {t.prefill / ref.prefill:>9.3f}x "
            f"{t.decode * 1e3:>14.2f} {t.decode / ref.decode:>9.3f}x"
        )
    return "\n".join(lines)
