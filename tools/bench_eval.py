"""How much faster is `malora-fx eval`'s greedy decoding with a KV cache than without?

Times, in one process and on the same examples, the exact-match decoding of a
run directory's adapted model two ways (malora_fx.training.evaluate):

    no cache   greedy_generate: every step re-reads every row (`--no-cache`)
    KV cache   greedy_generate_cached on cached_decoder(model, gm): one
               prefill, then one token per row and step (the default)

checks that both give the same tokens for every example, and prints the times,
the ratio and the machine. The one-off capture of the decoder with its cache
is timed on its own and counted in the "with capture" ratio; the per-task loss,
which `malora-fx eval` computes the same way on both paths, is left out.

    malora-fx data make --suite inter --out /tmp/evdata --train 10 --eval 25 --seed 0
    malora-fx transform smollm2-135m --out /tmp/evrun --targets q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj
    python tools/bench_eval.py /tmp/evrun --data /tmp/evdata/eval.jsonl             # all 150 examples
    python tools/bench_eval.py /tmp/evrun --data /tmp/evdata/eval.jsonl --limit 5   # 5 per task: quicker

``max_new_tokens`` is taken from the whole data file (longest reference + 2,
as `malora-fx eval` does), so a ``--limit`` subset decodes as far as the full
run. ``--randomize STD`` gives the adapters random values first (B included),
so a fresh run's adapters (B = 0) do not make adapted equal base.

On a machine shared with other busy processes, torch's default of one thread
per core can slow the many small ops of a decode step by an order of magnitude
(threads wait for each other's time slices); ``--threads 1`` avoids that, and
the load average is printed before and after so a reader can tell.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import malora_fx as mf
from malora_fx.adapters.run_dir import load_run
from malora_fx.training.data import encode, read_jsonl
from malora_fx.training.eval_decoder import cached_decoder
from malora_fx.training.evaluate import greedy_predictions


def limited(examples, limit: int | None):
    """At most ``limit`` examples per task, in file order (as `malora-fx eval --limit`)."""
    if not limit:
        return list(examples)
    seen: dict[str, int] = {}
    kept = []
    for e in examples:
        if seen.get(e.task, 0) < limit:
            seen[e.task] = seen.get(e.task, 0) + 1
            kept.append(e)
    return kept


def machine() -> str:
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="eval JSONL")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=16, help="as `malora-fx eval` (default 16)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--randomize", type=float, help="give the adapters random values of this std first")
    parser.add_argument("--skip-old", action="store_true", help="time the KV-cache path only (no comparison)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    torch.manual_seed(0)
    everything = read_jsonl(args.data)
    examples = limited(everything, args.limit)
    start = time.perf_counter()
    gm, loaded = load_run(args.run_dir)
    tok = loaded.tokenizer
    print(f"loaded {args.run_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    if args.randomize:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in mf.trainable_parameters(gm):
                param.copy_(torch.randn(param.shape, generator=gen) * args.randomize)
    encoded = [encode(e, tok, args.max_length) for e in everything]
    max_new_tokens = max(len(e.input_ids) - e.prompt_length for e in encoded) + 2
    options = dict(max_length=args.max_length, batch_size=args.batch_size, max_new_tokens=max_new_tokens)

    start = time.perf_counter()
    decoder = cached_decoder(loaded.model, gm)
    capture_s = time.perf_counter() - start
    if decoder is None:
        raise SystemExit(f"{args.run_dir}: the base model is not a decoder; nothing to compare")
    print(f"captured the decoder with its KV cache in {capture_s:.1f} s", flush=True)

    start = time.perf_counter()
    new = greedy_predictions(None, tok, examples, decoder=decoder, **options)
    new_s = time.perf_counter() - start
    print(f"KV cache: {len(examples)} examples in {new_s:.1f} s", flush=True)
    old_s = None
    if not args.skip_old:
        start = time.perf_counter()
        old = greedy_predictions(lambda i, m: gm(input_ids=i, attention_mask=m).logits, tok, examples, **options)
        old_s = time.perf_counter() - start
        print(f"no cache: {len(examples)} examples in {old_s:.1f} s", flush=True)

    tasks = sorted({e.task for e in examples})
    print(f"\nmachine: {machine()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(
        f"model: {loaded.model.__class__.__name__} from {args.run_dir}; {len(examples)} examples "
        f"({len(tasks)} tasks{f', --limit {args.limit}' if args.limit else ''}), batch size {args.batch_size}, "
        f"max_new_tokens {max_new_tokens}, generated tokens {sum(len(t) for t in new)}"
    )
    print(f"decoder capture (once per eval): {capture_s:8.1f} s")
    print(f"decode with KV cache:            {new_s:8.1f} s   ({new_s / len(examples):.2f} s per example)")
    if old_s is not None:
        same = sum(a == b for a, b in zip(old, new, strict=True))
        print(f"decode without cache:            {old_s:8.1f} s   ({old_s / len(examples):.2f} s per example)")
        print(f"speed-up: {old_s / new_s:.1f}x decoding, {old_s / (new_s + capture_s):.1f}x with the capture")
        print(f"identical predictions: {same} / {len(examples)}")
        if same != len(examples):
            for e, a, b in zip(examples, old, new, strict=True):
                if a != b:
                    print(f"  differs ({e.task}): no cache {tok.decode(a)!r} / KV cache {tok.decode(b)!r}")
            raise SystemExit(1)


if __name__ == "__main__":
    main()
