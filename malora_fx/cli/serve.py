"""``malora-fx run`` (generate with an export in onnxruntime), ``malora-fx bench`` (latency, alternated) and
``malora-fx verify`` (an export's outputs against its run's PyTorch model).

What an export holds is read from its ``export.json`` through
:class:`~malora_fx.deploy.manifest.ExportManifest` only. ``bench`` re-exports
comparison variants from the run directory given with ``--run`` (into a
temporary folder, removed at the end unless ``--keep``); the path an export
records in ``adapters`` is informational and never read back, so an export
folder can be copied anywhere. Bad input raises
:class:`~malora_fx.errors.MaloraError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MaloraError

if TYPE_CHECKING:
    from ..deploy.manifest import ExportManifest


def add_parsers(sub) -> None:
    """``run``, ``bench`` and ``verify``."""
    from ..deploy.bench import BENCH_NEW_TOKENS, BENCH_REPEATS, BENCH_SEQ

    p = sub.add_parser(
        "run",
        help="generate text with an exported model (onnxruntime-genai or onnxruntime)",
        description="Stream generated text from EXPORT_DIR using its KV cache, through onnxruntime-genai "
        "(when installed) or malora-fx's onnxruntime runner.",
    )
    p.add_argument("export_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--adapter", help="an .onnx_adapter file to activate for this run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _add_runtime_flags(p)
    p.add_argument(
        "--raw",
        action="store_true",
        help="use the prompt text as is: no chat template, no trailing newline (the tokenizer's BOS still applies)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench",
        help="onnxruntime prefill / decode latency: base vs lowered vs unlowered vs PyTorch",
        description="Time EXPORT_DIR against the base export, the unlowered export and PyTorch eager, "
        "alternated. The comparison exports are built from --run into a temporary folder, removed at the "
        "end unless --keep; EXPORT_DIR is only read.",
    )
    p.add_argument("export_dir")
    p.add_argument("--run", dest="run", help="the run directory EXPORT_DIR was exported from (required)")
    p.add_argument(
        "--keep", help="build the comparison exports in this directory and keep them (reused when already there)"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=BENCH_SEQ)
    p.add_argument("--new-tokens", type=int, default=BENCH_NEW_TOKENS)
    p.add_argument("--repeats", type=int, default=BENCH_REPEATS)
    _add_runtime_flags(p)
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    p.add_argument("--json", help="also write the timings here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "verify",
        help="compare an export's outputs with its run's PyTorch model (prefill, cached decode steps)",
        description="Run EXPORT_DIR in onnxruntime and the run's PyTorch model on the same prompts: the "
        "prefill, then greedy decode steps through the export's KV cache (PyTorch recomputes the whole "
        "sequence). Prints max |Δ| and the relative error per step; exit status 1 when one exceeds the "
        "tolerance (1e-4 for fp32, 2e-2 for fp16) or a greedy token differs beyond a tie.",
    )
    p.add_argument("export_dir")
    p.add_argument("--run", dest="run", required=True, help="the run directory EXPORT_DIR was exported from")
    p.add_argument("--provider", default="cpu", help="one of auto, cuda, cpu (default: cpu)")
    p.add_argument("--prompt", action="append", help="a prompt to compare on (repeatable; default: three built in)")
    p.add_argument("--steps", type=int, default=3, help="cached decode steps after each prefill (default: 3)")
    p.add_argument("--tolerance", type=float, help="relative tolerance (default: 1e-4 fp32, 2e-2 fp16)")
    p.add_argument(
        "--genai",
        action="store_true",
        help="also decode the greedy tokens with onnxruntime-genai (the genai extra) and compare them",
    )
    p.add_argument("--json", help="also write the comparisons here")
    p.set_defaults(func=cmd_verify)


def _add_runtime_flags(p) -> None:
    """``--backend``, ``--provider`` and ``--io-binding`` (shared by run and bench)."""
    from ..deploy.backends import BACKENDS
    from ..deploy.runner import PROVIDERS

    p.add_argument(
        "--backend",
        default="auto",
        help=f"one of {', '.join(BACKENDS)}: genai = onnxruntime-genai (the genai extra), "
        "ort = malora-fx's onnxruntime runner; auto = genai on CUDA (onnxruntime-genai-cuda), else ort",
    )
    p.add_argument("--provider", default="auto", help=f"one of {', '.join(PROVIDERS)} (auto = CUDA when available)")
    p.add_argument(
        "--io-binding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ort backend: keep the KV cache on the device with IOBinding (default: on with CUDA, off on CPU)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ..deploy.backends import describe, open_generator
    from ..training.data import format_prompt
    from ..training.evaluate import stop_token_ids

    gen = open_generator(args.export_dir, args.backend, args.provider, args.io_binding)
    print(f"malora-fx: {describe(gen)}", file=sys.stderr)
    tok = gen.tokenizer
    prompt = format_prompt(tok, args.prompt, raw=args.raw)  # the same ids training and eval use
    produced: list[int] = []
    shown = ""
    stream = gen.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_ids=stop_token_ids(tok),
        adapter=args.adapter,
        seed=args.seed,
    )
    stop: int | None = None
    while True:
        try:
            token = next(stream)
        except StopIteration as end:
            stop = end.value
            break
        produced.append(token)
        text_now = str(tok.decode(produced, skip_special_tokens=True))
        print(text_now[len(shown) :], end="", flush=True)
        shown = text_now
    if shown:
        print()
    else:
        print(f"malora-fx: {_why_nothing(tok, produced, stop, args.max_new_tokens)}", file=sys.stderr)
    return 0


def _why_nothing(tok, produced: list[int], stop: int | None, max_new_tokens: int) -> str:
    """One line saying why ``run`` shows no text."""
    if produced:
        return f"no text to show: the {len(produced)} generated token(s) {produced} decode to nothing visible"
    if stop is not None:
        name = tok.convert_ids_to_tokens(stop)
        kind = "end-of-sequence" if stop == tok.eos_token_id else "a stop token"
        return f"no tokens generated: the first token was {kind} {name!r} (id {stop})"
    return f"no tokens generated: --max-new-tokens is {max_new_tokens}"


def cmd_bench(args: argparse.Namespace) -> int:
    import platform
    import shutil
    import tempfile
    import time

    from ..deploy.backends import choose_backend, describe, open_generator
    from ..deploy.bench import GenaiTimer, benchmark, format_table, ort_runner, time_once
    from ..deploy.genai_runner import GenaiGenerator
    from ..deploy.runner import read_export

    manifest = read_export(args.export_dir)
    if not manifest.kv_cache or manifest.method is None:
        raise MaloraError(f"{args.export_dir}: bench needs an adapted decoder export with a KV cache")
    if not args.run:
        raise MaloraError(
            f"--run: required; give the run directory {args.export_dir} was exported from "
            f"(export.json records {manifest.adapters!r}, for information only)"
        )
    _check_bench_run(args.run, manifest)
    for name in ("batch", "seq", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise MaloraError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if args.batch != 1 and choose_backend(args.backend, args.export_dir, args.provider) == "genai":
        raise MaloraError(f"--batch: {args.batch}; onnxruntime-genai is timed at batch 1 only (or use --backend ort)")
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.exists() and (not keep.is_dir() or _foreign_entries(keep)):
        raise MaloraError(
            f"--keep: {keep} exists and holds other files; allowed: a new or empty directory or a previous --keep"
        )
    stages = 3 + (not args.no_torch)
    say = _Progress(stages)
    print(
        f"malora-fx: bench builds 2 comparison exports of {args.run} (base, unlowered; each takes about as "
        f"long as `malora-fx export` did) in {keep or 'a temporary folder removed at the end'}, "
        + ("" if args.no_torch else "captures the run in PyTorch, ")
        + f"then times {3 + (not args.no_torch)} variants {1 + args.repeats} times each",
        file=sys.stderr,
    )
    scratch = keep if keep is not None else Path(tempfile.mkdtemp(prefix="malora-fx-bench-"))
    try:

        def timed(export_dir):
            gen = open_generator(export_dir, args.backend, args.provider, args.io_binding)
            return gen, GenaiTimer(gen) if isinstance(gen, GenaiGenerator) else ort_runner(gen)

        lowered, lowered_run = timed(args.export_dir)
        with say("base export"):
            _, base_run = timed(_cached_export(args.run, manifest, scratch / "base", base_only=True))
        variants = {"base export": base_run, "lowered export": lowered_run}
        with say("unlowered export"):
            try:
                variants["unlowered export"] = timed(
                    _cached_export(args.run, manifest, scratch / "unlowered", lowered=False)
                )[1]
            except Exception as exc:  # report, do not fail: the point is whether it exports at all
                print(f"unlowered export: does not export ({str(exc).splitlines()[0][:120]})", file=sys.stderr)
        if not args.no_torch:
            with say("PyTorch eager capture"):
                variants["pytorch eager"] = _torch_variant(args.run, manifest)
        print(
            f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {describe(lowered)}"
        )
        vocab = min(manifest.vocab_size or 1000, 1000)
        start = time.perf_counter()
        time_once(variants["lowered export"], args.batch, args.seq, args.new_tokens, vocab)
        once = time.perf_counter() - start + 0.5
        estimate = once * len(variants) * (1 + args.repeats)
        with say(f"timing {len(variants)} variants x {1 + args.repeats} rounds (about {estimate:.0f} s)"):
            timings = benchmark(
                variants,
                batch=args.batch,
                seq=args.seq,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                vocab=vocab,
            )
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(format_table(timings, args.batch, args.seq))
    if args.json:
        Path(args.json).write_text(
            json.dumps({n: {"prefill_s": t.prefill_s, "decode_s": t.decode_s} for n, t in timings.items()}, indent=2)
        )
    return 0


class _Progress:
    """``with say("stage"):`` prints ``[i/n] stage ...`` then ``done in Ns`` on stderr, one line per stage."""

    def __init__(self, total: int) -> None:
        self.total, self.index = total, 0

    def __call__(self, stage: str):
        import contextlib
        import time

        self.index += 1

        @contextlib.contextmanager
        def run():
            print(f"malora-fx: [{self.index}/{self.total}] {stage} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            yield
            print(
                f"malora-fx: [{self.index}/{self.total}] {stage}: done in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )

        return run()


def _foreign_entries(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name not in ("base", "unlowered")]


def _check_bench_run(run_dir: str, manifest: ExportManifest) -> None:
    """``run_dir`` must be a run of the export's base model and method."""
    from ..adapters.files import read_adapter_config

    info = read_adapter_config(run_dir)
    for key in ("base_model", "method"):
        if info.get(key) != getattr(manifest, key):
            raise MaloraError(
                f"--run: {run_dir} has {key} {info.get(key)!r}, the export was made with {getattr(manifest, key)!r}; "
                "allowed: the run directory the export came from"
            )


def _cached_export(run_dir: str, manifest: ExportManifest, out: Path, **options) -> Path:
    """``out``, exported from ``run_dir`` unless already there (a previous ``--keep``)."""
    from ..deploy.manifest import EXPORT_JSON
    from ..deploy.onnx_export import export_run

    if not (out / EXPORT_JSON).is_file():
        export_run(run_dir, out, dtype=manifest.dtype, opset=manifest.opset, **options)
    return out


def _torch_variant(run_dir: str, manifest: ExportManifest):
    """PyTorch eager over ``run_dir`` (the run the manifest names), captured with the export's cache geometry."""
    from ..adapters.run_dir import apply_run_adapters, read_run
    from ..deploy.bench import torch_runner
    from ..deploy.manifest import torch_dtype
    from ..graph.cached_decoder import capture_decoder

    dtype = torch_dtype(manifest.dtype)
    info, loaded = read_run(run_dir)
    gm, _ = capture_decoder(loaded.model.to(dtype), dtype)
    gm = apply_run_adapters(gm, run_dir, info)
    return torch_runner(gm, *manifest.cache_geometry(), dtype=dtype)


def cmd_verify(args: argparse.Namespace) -> int:
    from ..deploy.verify import DEFAULT_PROMPTS, verify_export
    from ..fileio import atomic_write

    result = verify_export(
        args.export_dir,
        args.run,
        provider=args.provider,
        prompts=args.prompt or DEFAULT_PROMPTS,
        steps=args.steps,
        tolerance=args.tolerance,
        genai=args.genai,
    )
    print(result.table())
    if args.json:
        text = json.dumps(result.to_dict(), indent=2) + "\n"
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))
    return 0 if result.passed else 1
