"""``malora-fx verify``: an export's outputs against the PyTorch model of the run it came from.

What is compared, per prompt (tokenised by the export's tokenizer as ``malora-fx run`` does; batch 1):

* a decoder with a KV cache: the prefill's logits, then ``steps`` decode steps through the export's own
  cache, each fed PyTorch's greedy token so that both sides see one sequence. PyTorch recomputes the
  whole sequence at every step, without a cache, so a cache bug on either side shows;
* a causal LM exported without a cache: the prompt's logits;
* an encoder: the export's first output (``last_hidden_state``).

Each comparison gives max |Δ| and max |Δ| / max |reference|, the relative error the tolerance bounds
(1e-4 for an fp32 export, 2e-2 for fp16), and whether the greedy (argmax) tokens agree. A differing
token is shown but is not a failure by itself: it needs a difference of at least half the reference's
top-two margin, so the tolerance already decides whether it is allowed (in fp16 a near tie may flip).
With ``genai=True`` onnxruntime-genai also decodes ``steps`` greedy tokens of each prompt, which must be
PyTorch's, token for token.

The reference is the run's adapted PyTorch graph (the base model for ``--base-only`` exports), fp32 on
the CPU, from the run directory given (as with ``bench``, the path ``export.json`` records is not read back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MaloraError
from .runner import choose_provider, read_export

__all__ = ["DEFAULT_PROMPTS", "TOLERANCES", "Check", "Verification", "verify_export"]

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Ben has 15 pencils and gives away 4. How many pencils does he have left?",
    "Sort these words alphabetically: pear, apple, fig.",
)
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}
VERIFIABLE_KINDS = ("decoder", "causal-lm", "encoder")


@dataclass(frozen=True)
class Check:
    """One comparison: prompt ``prompt`` (index), at ``stage`` (``prefill``, ``decode N``, ``genai``)."""

    prompt: int
    stage: str
    max_abs: float | None  # None: a token-only check (onnxruntime-genai)
    relative: float | None
    tokens_agree: bool | None  # None: no tokens compared (an encoder's hidden states)
    detail: str = ""
    tokens_required: bool = False  # a differing token fails the check (onnxruntime-genai's tokens)


@dataclass(frozen=True)
class Verification:
    export_dir: str
    run_dir: str
    kind: str
    dtype: str
    provider: str
    tolerance: float
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [
            c
            for c in self.checks
            if (c.relative is not None and c.relative > self.tolerance) or (c.tokens_required and not c.tokens_agree)
        ]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    def table(self) -> str:
        lines = [f"{'prompt':>6}  {'stage':<10} {'max |Δ|':>10} {'relative':>10}  tokens"]
        for c in self.checks:
            if c.tokens_agree is None:
                mark = "–"
            else:
                mark = "same" if c.tokens_agree else ("DIFFER" if c.tokens_required else "differ")
            numbers = "".join(f" {'–' if v is None else f'{v:.2e}':>10}" for v in (c.max_abs, c.relative))
            lines.append(f"{c.prompt:>6}  {c.stage:<10}{numbers}  {mark}" + (f"  ({c.detail})" if c.detail else ""))
        worst = max((c.relative for c in self.checks if c.relative is not None), default=0.0)
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures)} of {len(self.checks)} checks)"
        lines.append(
            f"{verdict}: worst relative error {worst:.2e} (tolerance {self.tolerance:g} for {self.dtype}), "
            f"{self.kind} on {self.provider}"
        )
        return "\n".join(lines)


def _compare(prompt: int, stage: str, out: np.ndarray, ref: np.ndarray, tokens: bool) -> Check:
    """``out`` against ``ref`` (same shape); ``tokens``: also the argmax over the last axis at the last position."""
    out, ref = out.astype(np.float32), ref.astype(np.float32)
    max_abs = float(np.abs(out - ref).max())
    relative = max_abs / max(float(np.abs(ref).max()), 1e-12)
    if not tokens:
        return Check(prompt, stage, max_abs, relative, None)
    last_out, last_ref = out.reshape(-1, out.shape[-1])[-1], ref.reshape(-1, ref.shape[-1])[-1]
    mine, theirs = int(last_out.argmax()), int(last_ref.argmax())
    top2 = np.sort(last_ref)[-2:]
    detail = "" if mine == theirs else f"token {mine} vs {theirs}, reference margin {float(top2[1] - top2[0]):.2e}"
    return Check(prompt, stage, max_abs, relative, mine == theirs, detail)


def _reference(run_dir: str, base_only: bool) -> Callable[..., Any]:
    """The PyTorch model to compare with, called with the export's input names."""
    from ..adapters.run_dir import load_run

    gm, loaded = load_run(run_dir)
    return loaded.model.eval() if base_only else gm


def _prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    from ..training.data import format_prompt

    ids = [format_prompt(tokenizer, p) for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise MaloraError(f"prompt: {prompts[empty[0]]!r} has no tokens; give a non-empty prompt")
    return ids


@torch.no_grad()
def _decoder_checks(export_dir: Path, model, prompts: list[list[int]], steps: int, provider: str) -> list[Check]:
    from .runner import OrtGenerator

    gen = OrtGenerator(export_dir, provider)
    checks = []
    for index, prompt in enumerate(prompts):
        seq = torch.tensor([prompt])
        cache = gen.new_cache(1)
        n = seq.shape[1]
        out = cache(seq.numpy(), np.ones((1, n), np.int64), np.arange(n)[None])
        ref = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits.numpy()
        checks.append(_compare(index, "prefill", out, ref, tokens=True))
        for step in range(1, steps + 1):
            nxt = torch.tensor([[int(ref[0, -1].argmax())]])
            seq = torch.cat([seq, nxt], 1)
            n = seq.shape[1]
            out = cache(nxt.numpy(), np.ones((1, n), np.int64), np.full((1, 1), n - 1))
            ref = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1:].numpy()
            checks.append(_compare(index, f"decode {step}", out[:, -1:], ref, tokens=True))
    return checks


@torch.no_grad()
def _single_pass_checks(export_dir: Path, manifest, model, prompts: list[list[int]], provider_name: str) -> list[Check]:
    """A causal LM without a cache (logits) or an encoder (its first output), one forward per prompt
    (``provider_name``: the execution provider, e.g. ``CPUExecutionProvider``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(export_dir / "model.onnx"), options, providers=[provider_name])
    output = manifest.outputs[0]
    checks = []
    for index, prompt in enumerate(prompts):
        ids = np.asarray([prompt], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in manifest.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (out,) = session.run([output], feeds)
        result = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        ref = getattr(result, output) if hasattr(result, output) else result[0]
        checks.append(_compare(index, "forward", out, ref.float().numpy(), tokens=output == "logits"))
    return checks


@torch.no_grad()
def _genai_checks(export_dir: Path, model, prompts: list[list[int]], steps: int, provider: str) -> list[Check]:
    """onnxruntime-genai's greedy tokens against PyTorch's (full recompute), ``steps`` per prompt."""
    from ..training.evaluate import greedy_generate
    from .genai_runner import GenaiGenerator

    gen = GenaiGenerator(export_dir, provider)
    checks = []
    for index, prompt in enumerate(prompts):
        produced = list(gen.generate(prompt, max_new_tokens=steps))
        expected = greedy_generate(
            lambda i, m: model(input_ids=i, attention_mask=m).logits,
            [prompt],
            max_new_tokens=steps,
            stop_ids=set(),
            pad_id=0,
        )[0]
        same = produced == expected[: len(produced)] and (len(produced) == steps or _is_eos(gen, expected, produced))
        detail = "" if same else f"genai {produced} vs PyTorch {expected}"
        checks.append(Check(index, "genai", None, None, same, detail, tokens_required=True))
    return checks


def _is_eos(gen, expected: list[int], produced: list[int]) -> bool:
    """onnxruntime-genai stopped early: at an end-of-sequence token PyTorch also chose there."""
    from ..training.evaluate import stop_token_ids

    return len(expected) > len(produced) and expected[len(produced)] in stop_token_ids(gen.tokenizer)


def verify_export(
    export_dir: str | Path,
    run_dir: str | Path,
    *,
    provider: str = "cpu",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    steps: int = 3,
    tolerance: float | None = None,
    genai: bool = False,
) -> Verification:
    """Compare ``export_dir`` with its run's PyTorch model (see the module docstring); raises
    :class:`MaloraError` for what cannot be verified (no such export or run, a graph export, bad values)."""
    directory = Path(export_dir)
    manifest = read_export(directory)
    provider_name = choose_provider(provider)  # an unknown or missing provider fails before any work
    if manifest.kind not in VERIFIABLE_KINDS:
        raise MaloraError(
            f"{directory}: kind {manifest.kind!r} has no run to compare with; "
            f"verify handles {', '.join(VERIFIABLE_KINDS)}"
        )
    if steps < 0:
        raise MaloraError(f"steps: {steps}; allowed: 0 or more")
    if not prompts:
        raise MaloraError("prompts: none given; give at least one")
    if tolerance is not None and not tolerance > 0:
        raise MaloraError(f"tolerance: {tolerance}; allowed: a number > 0")
    run = str(run_dir)
    if not Path(run).is_dir():
        raise MaloraError(f"run: {run!r} is not a directory; give the run this export came from")
    if genai and not manifest.kv_cache:
        raise MaloraError("genai: onnxruntime-genai serves decoders exported with a KV cache only")
    model = _reference(run, base_only=manifest.method is None)
    from transformers import AutoTokenizer

    ids = _prompt_ids(AutoTokenizer.from_pretrained(str(directory)), prompts)
    if manifest.kv_cache:
        checks = _decoder_checks(directory, model, ids, steps, provider)
    else:
        checks = _single_pass_checks(directory, manifest, model, ids, provider_name)
    if genai:
        checks += _genai_checks(directory, model, ids, steps, provider)
    return Verification(
        export_dir=str(directory),
        run_dir=run,
        kind=manifest.kind,
        dtype=manifest.dtype,
        provider=provider_name,
        tolerance=tolerance if tolerance is not None else TOLERANCES[manifest.dtype],
        checks=tuple(checks),
    )
