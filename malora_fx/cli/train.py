"""``malora-fx data make``, ``train``, ``eval`` and ``inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MaloraError
from .flags import OneLineParser, add_dataclass_flags, dataclass_from_args


def add_parsers(sub) -> None:
    """``data make``, ``train``, ``eval`` and ``inspect``."""
    from ..training.args import TrainArgs

    p = sub.add_parser("data", help="built-in multi-task data suites")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    make = data_sub.add_parser(
        "make",
        help="write a built-in task suite as train/eval JSONL",
        description="Write OUT/train.jsonl and OUT/eval.jsonl of a procedurally generated suite.",
    )
    make.add_argument("--suite", required=True, help="inter (different domains) or intra (one domain)")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--train", type=int, default=200, help="training examples per task (default 200)")
    make.add_argument("--eval", type=int, default=20, help="eval examples per task (default 20)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    make.set_defaults(func=cmd_data_make)

    p = sub.add_parser(
        "train",
        help="train the adapters of a run directory on JSONL data",
        description="Train the adapters in RUN_DIR (made by `malora-fx transform`).",
    )
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--eval", help="eval JSONL (per-task loss at the end)")
    add_dataclass_flags(p, TrainArgs)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="per-task loss and exact match of a run directory",
        description="Greedy-decode every eval prompt; report per-task loss and exact match.",
    )
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="eval JSONL")
    p.add_argument("--base", action="store_true", help="also evaluate the untransformed base model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, help="default: longest reference response + 2")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cache", action="store_true", help="greedy-decode without a KV cache (slower; the same tokens)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "inspect",
        help="per-task expert load of every routed site (router collapse at a glance)",
        description="Count the routers' top-k choices per task over real tokens.",
    )
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="JSONL whose tasks to route")
    p.add_argument("--plot", help="write a heatmap PNG here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def cmd_data_make(args: argparse.Namespace) -> int:
    from ..training.suites import write_suite

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise MaloraError(f"--out {str(out)!r} exists and is not empty; choose a new directory or pass --overwrite")
    paths = write_suite(args.suite, args.out, train=args.train, eval=args.eval, seed=args.seed)
    for split, path in paths.items():
        lines = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{split}: {path} ({lines} examples)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.args import TrainArgs
    from ..training.loop import train

    result = train(
        args.run_dir,
        args.data,
        dataclass_from_args(TrainArgs, args),
        eval_data=args.eval,
        progress=not args.no_progress,
    )
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
    from ..training.data import read_jsonl
    from ..training.eval_decoder import cached_decoder, load_run_for_eval
    from ..training.evaluate import evaluate

    _check_counts(args, ("batch_size", "max_length", "max_new_tokens", "limit"))
    examples = _limit(read_jsonl(args.data), args.limit)
    logits_fn, decoder, loaded = load_run_for_eval(args.run_dir, use_cache=not args.no_cache, device=args.device)
    options = dict(
        max_length=args.max_length, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device
    )
    adapted = _eval_progress("adapted", len(examples), args.batch_size, logits_fn, decoder)
    results = {"adapted": adapted.run(evaluate, loaded.tokenizer, examples, **options)}
    if args.base:
        base = loaded.model.to(args.device)
        progress = _eval_progress(
            "base",
            len(examples),
            args.batch_size,
            lambda i, m: base(input_ids=i, attention_mask=m, use_cache=False).logits,
            None if args.no_cache else cached_decoder(base),
        )
        results["base"] = progress.run(evaluate, loaded.tokenizer, examples, **options)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_eval_table(results)
    return 0


class _eval_progress:  # noqa: N801 - used like a function
    """Progress of one ``evaluate`` run on stderr: a start line, a line every few seconds with the
    model calls made so far (prefill and decode steps of every batch), and a final line; stdout
    keeps the results only."""

    def __init__(
        self, name: str, examples: int, batch_size: int, logits_fn, decoder=None, every_s: float = 5.0
    ) -> None:
        self.name, self.examples, self.batch_size, self.logits_fn = name, examples, batch_size, logits_fn
        self.decoder = decoder  # a CachedDecoder (greedy decoding with a KV cache), or None
        self.calls, self.every_s = 0, every_s
        self.began = self.last = 0.0

    def __call__(self, ids, mask):
        self._tick()
        return self.logits_fn(ids, mask)

    def step(self, ids, mask, positions, past):
        self._tick()
        return self.decoder(ids, mask, positions, past)

    def _tick(self) -> None:
        import time

        self.calls += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(
                f"malora-fx: eval {self.name}: {self.calls} model calls, {now - self.began:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def run(self, evaluate, tokenizer, examples, **options):
        import time

        batches = -(-self.examples // max(self.batch_size, 1))
        print(
            f"malora-fx: eval {self.name}: {self.examples} examples in about {batches} batches of {self.batch_size}",
            file=sys.stderr,
            flush=True,
        )
        self.began = self.last = time.perf_counter()
        decoder = self.step if self.decoder is not None else None
        result = evaluate(self, tokenizer, examples, decoder=decoder, **options)
        print(
            f"malora-fx: eval {self.name}: done ({self.calls} model calls, {time.perf_counter() - self.began:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return result


def print_eval_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    columns = list(results)
    tasks = list(results[columns[0]])
    width = max(len("task"), *(len(t) for t in tasks))
    head = "".join(f"  {c + ' loss':>12}  {c + ' EM':>10}" for c in columns)
    print(f"{'task':<{width}}  {'n':>4}{head}")
    for task in tasks:
        row = "".join(
            f"  {results[c][task]['loss']:>12.4f}  {100 * results[c][task]['exact_match']:>9.1f}%" for c in columns
        )
        print(f"{task:<{width}}  {int(results[columns[0]][task]['n']):>4}{row}")


def _check_counts(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Count options must be >= 1 (the library would loop forever or fail deep inside)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise MaloraError(f"--{name.replace('_', '-')}: {value} is not allowed; expected an integer >= 1")


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..adapters.run_dir import load_run
    from ..training.data import read_jsonl
    from ..training.routing_report import expert_load, plot_expert_load

    _check_counts(args, ("batch_size", "max_length", "max_new_tokens", "limit"))
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
            print(
                f"{task}: {len(per_site)} sites; most often busiest expert {top}; "
                f"mean load of each site's busiest expert {share:.2f} (balanced: {_balanced(per_site):.2f})"
            )
        if args.plot:
            print(f"heatmap: {args.plot}")
    return 0


def _balanced(per_site) -> float:
    loads = next(iter(per_site.values()))
    return sum(loads) / len(loads)
