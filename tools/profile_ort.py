"""Where an ONNX decoder's time goes: onnxruntime's own profiler, summed per op type.

For each model folder given (ours or the onnxruntime-genai builder's: anything with
``model.onnx`` and ``genai_config.json``), runs ``--runs`` decode steps (one new token after
``--past`` cached positions) or prefills (``--prefill``, 1 x ``--past`` tokens) with profiling
on, and prints per op type: kernel microseconds per run, nodes per run, and the difference to
the first folder. The profiler adds its own overhead, so read the columns as shares, and time
with ``tools/bench_serving.py``.

    python tools/profile_ort.py runs/bench-serving/builder runs/bench-serving/ours-base \\
        runs/bench-serving/ours-malora --top 14
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from bench_serving import decoder_feeds  # tools/ is on sys.path when this file runs as a script


def profile(folder: Path, past: int, new: int, runs: int, threads: int) -> tuple[float, dict[str, list[float]]]:
    """(median run microseconds, {op type: [kernel us per run, nodes per run]})."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "prof")
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feeds = decoder_feeds(session, folder, np.random.default_rng(0), new=new, past=past)
        for _ in range(3 + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    run_times = sorted(e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")[3:]
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            row = per_op[event["args"]["op_name"]]
            row[0] += event["dur"] / (3 + runs)
            row[1] += 1 / (3 + runs)
    return float(np.median(run_times)), dict(per_op)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--prefill", action="store_true", help="profile a 1 x --past prefill instead of a decode step")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    past, new = (0, args.past) if args.prefill else (args.past, 1)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs; {args.threads} intra-op threads; "
        f"{'prefill 1x' + str(new) if args.prefill else f'decode 1 token after {past}'}; {args.runs} runs"
    )
    results = {folder: profile(folder, past, new, args.runs, args.threads) for folder in args.folders}
    reference = results[args.folders[0]][1]
    for folder, (median, ops) in results.items():
        total = sum(t for t, _ in ops.values())
        nodes = sum(n for _, n in ops.values())
        print(f"\n{folder}: run {median / 1e3:.2f} ms (profiled), kernels {total / 1e3:.2f} ms, {nodes:.0f} nodes")
        print(f"  {'op':34s} {'us/run':>9s} {'nodes':>6s} {'vs first us':>12s}")
        for op, (us, count) in sorted(ops.items(), key=lambda item: -item[1][0])[: args.top]:
            print(f"  {op:34s} {us:9.0f} {count:6.0f} {us - reference.get(op, [0.0])[0]:+12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
