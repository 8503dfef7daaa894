"""Serving benchmark: malora-fx exports against the onnxruntime-genai builder's graph of the same model.

In one process, alternated (A, B, C, ... A, B, C ... so machine drift hits all alike), for each graph:

* raw ``onnxruntime.InferenceSession`` (``--threads`` intra-op threads): a prefill of 1 x ``--seq`` tokens
  (empty cache) and one decode step after ``--seq`` tokens (mean of ``--decode-steps`` calls);
* onnxruntime-genai end to end: ``append_tokens`` of a ``--seq``-token prompt, then ``--og-tokens``
  tokens with ``generate_next_token`` -> tokens/s.

Graphs (all built here, from the packaged SmolLM2-135M, into ``--work``; an existing one is reused):

* ``builder``       ``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu``
* ``builder+lora``  the same with a PEFT LoRA r64 on q,k,v,gate,up,down (``--extra_options adapter_path=``)
* ``ours base``     ``malora-fx export --base-only``
* ``ours malora``   ``malora-fx export`` of MALoRA (8 experts, top-2, defaults) on the same six targets
* ``ours lora``     ``malora-fx export`` of the same PEFT LoRA r64 (``malora-fx import-peft``)
* ``ours malora moe`` (with ``--moe``) ``malora-fx export --moe-kernel`` of the same MALoRA run: each routed
  site one onnxruntime MoE node (top-k experts computed)

Adapter weights are random and non-zero (latency does not depend on their values). Prints medians, ratios
to ``builder``, each export's build time, and names the machine; ``--json`` / ``--markdown`` write them.

``--device cuda`` builds every graph in fp16 for CUDA (the builder with ``-p fp16 -e cuda``, ours with
``--dtype fp16``; the graphs are built without a GPU, so ``--build-only`` works anywhere) and times them
on onnxruntime's CUDA execution provider (raw sessions: inputs from host memory, as the builder's graph
gets them too) and onnxruntime-genai with the ``cuda`` provider (onnxruntime-gpu and
onnxruntime-genai-cuda installed; ``--threads`` is then irrelevant).

    python tools/bench_serving.py --work runs/bench-serving --markdown runs/bench-serving/table.md
    python tools/bench_serving.py --device cuda --work runs/bench-serving-cuda --json runs/bench-serving-cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIX = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = "smollm2-135m"


def log(message: str) -> None:
    print(f"bench_serving: {message}", file=sys.stderr, flush=True)


def timed_build(name: str, path: Path, build) -> float | None:
    """Build ``path`` with ``build()`` unless it exists; the seconds it took (None when reused)."""
    if path.exists():
        log(f"{name}: reusing {path}")
        return None
    log(f"{name}: building {path} ...")
    start = time.perf_counter()
    build()
    seconds = time.perf_counter() - start
    log(f"{name}: built in {seconds:.0f} s")
    return seconds


def write_hf_dir(out: Path) -> None:
    """A transformers directory of the packaged model (safetensors + config with architectures + tokenizer)."""
    import malora_fx as mf
    from malora_fx.graph.sources import write_transformers_dir

    write_transformers_dir(mf.load_model(MODEL), out)


def write_peft_lora(hf_dir: Path, out: Path, rank: int = 64) -> None:
    """A PEFT LoRA (rank ``rank``, alpha 2 x rank) on the six targets, with random non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=SIX, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.002)
    peft_model.save_pretrained(str(out))


def run_builder(hf_dir: Path, out: Path, adapter: Path | None = None, device: str = "cpu") -> None:
    """The onnxruntime-genai builder's graph of ``hf_dir``: fp32 for the CPU, fp16 for ``device`` cuda."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
    cmd += ["-p", "fp16", "-e", "cuda"] if device == "cuda" else ["-p", "fp32", "-e", "cpu"]
    if adapter is not None:
        cmd += ["--extra_options", f"adapter_path={adapter}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"builder failed:\n{done.stderr[-2000:]}")


def write_malora_run(out: Path) -> None:
    import torch

    import malora_fx as mf

    loaded = mf.load_model(MODEL)
    gm = mf.transform(loaded.model, mf.MALoRAConfig(targets=",".join(SIX)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in mf.trainable_parameters(gm):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    mf.save_adapters(gm, out, base_model=MODEL)


def build_all(
    work: Path, moe: bool = False, device: str = "cpu"
) -> tuple[dict[str, Path], dict[str, float | None], dict[str, dict[str, float]]]:
    """Build (or reuse) every graph (``moe``: also ``ours malora moe``; ``device`` cuda: fp16 graphs for
    CUDA); returns their folders, build seconds and our exports' stage seconds."""
    dtype = "fp16" if device == "cuda" else "fp32"
    from malora_fx.deploy.onnx_export import export_run
    from malora_fx.deploy.peft_import import convert_peft
    from malora_fx.deploy.stage_clock import StageClock

    stages: dict[str, dict[str, float]] = {}

    def export(name: str, run: Path, **options) -> None:
        clock = StageClock(say=log, prefix=f"{name}: ")
        export_run(run, graphs[name], clock=clock, dtype=dtype, **options)
        stages[name] = clock.seconds

    hf, peft = work / "hf", work / "peft-lora-r64"
    malora_run, lora_run = work / "run-malora", work / "run-lora"
    graphs = {
        "builder": work / "builder",
        "builder+lora": work / "builder-lora",
        "ours base": work / "ours-base",
        "ours malora": work / "ours-malora",
        "ours lora": work / "ours-lora",
    }
    timed_build("HF directory", hf, lambda: write_hf_dir(hf))
    timed_build("PEFT LoRA r64", peft, lambda: write_peft_lora(hf, peft))
    timed_build("MALoRA run", malora_run, lambda: write_malora_run(malora_run))
    timed_build("LoRA run", lora_run, lambda: convert_peft(peft, lora_run, MODEL))
    seconds = {
        "builder": timed_build("builder", graphs["builder"], lambda: run_builder(hf, graphs["builder"], None, device)),
        "builder+lora": timed_build(
            "builder+lora", graphs["builder+lora"], lambda: run_builder(hf, graphs["builder+lora"], peft, device)
        ),
        "ours base": timed_build(
            "ours base", graphs["ours base"], lambda: export("ours base", malora_run, base_only=True)
        ),
        "ours malora": timed_build("ours malora", graphs["ours malora"], lambda: export("ours malora", malora_run)),
        "ours lora": timed_build("ours lora", graphs["ours lora"], lambda: export("ours lora", lora_run)),
    }
    if moe:
        graphs["ours malora moe"] = work / "ours-malora-moe"
        seconds["ours malora moe"] = timed_build(
            "ours malora moe",
            graphs["ours malora moe"],
            lambda: export("ours malora moe", malora_run, moe_kernel=True),
        )
    return graphs, seconds, stages


def remember(path: Path, values: dict) -> dict:
    """Merge this run's build records into ``path`` (a reused graph keeps what was recorded when it was built)."""
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update({name: value for name, value in values.items() if value is not None})
    path.write_text(json.dumps(known, indent=2) + "\n")
    return {name: known.get(name) for name in values}


def decoder_feeds(session, folder: Path, rng, new: int, past: int) -> dict[str, np.ndarray]:
    """Random inputs for one call of a decoder graph (ours or the builder's): ``new`` token ids after a
    random cache of ``past`` positions, from the session's input names and ``genai_config.json``."""
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        name = arg.name
        if name == "input_ids":
            feeds[name] = rng.integers(0, 1000, size=(1, new), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + new), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + new, dtype=np.int64)[None]
        elif name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in arg.type else np.float32
            feeds[name] = rng.standard_normal((1, kv_heads, past, head_dim)).astype(dtype)
        else:
            raise SystemExit(f"{folder}: input {name!r} is not one this benchmark knows how to feed")
    return feeds


class RawSession:
    """Raw InferenceSession timing: prefill 1 x seq, one decode step after seq (feeds made from input names)."""

    def __init__(self, folder: Path, threads: int, seq: int, device: str = "cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=providers)
        if self.session.get_providers()[0] != providers[0]:
            raise SystemExit(f"{folder}: onnxruntime gave {self.session.get_providers()}, not {providers[0]}")
        self.seq = seq
        rng = np.random.default_rng(0)
        self.prefill_feeds = decoder_feeds(self.session, folder, rng, new=seq, past=0)
        self.decode_feeds = decoder_feeds(self.session, folder, rng, new=1, past=seq)

    def prefill(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.prefill_feeds)
        return time.perf_counter() - start

    def decode(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.session.run(None, self.decode_feeds)
        return (time.perf_counter() - start) / steps


class GenaiEndToEnd:
    """onnxruntime-genai: prefill (append_tokens) and tokens/s of generate_next_token."""

    def __init__(self, folder: Path, threads: int, seq: int, tokens: int, device: str = "cpu") -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.clear_providers()
        if device == "cuda":
            config.append_provider("cuda")
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.prompt = np.random.default_rng(1).integers(0, 1000, size=(seq,)).tolist()
        self.tokens = tokens

    def run(self) -> tuple[float, float]:
        params = self.og.GeneratorParams(self.model)
        total = len(self.prompt) + self.tokens + 1
        params.set_search_options(max_length=total, min_length=total, do_sample=False, top_k=1)
        generator = self.og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(self.prompt)
        prefill = time.perf_counter() - start
        generator.generate_next_token()  # sampled from the prefill's logits: no model run
        start = time.perf_counter()
        for _ in range(self.tokens):
            generator.generate_next_token()
        return prefill, self.tokens / (time.perf_counter() - start)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs"


def measure(graphs: dict[str, Path], args) -> dict[str, dict[str, list[float]]]:
    raw = {name: RawSession(path, args.threads, args.seq, args.device) for name, path in graphs.items()}
    genai = {
        name: GenaiEndToEnd(path, args.threads, args.seq, args.og_tokens, args.device) for name, path in graphs.items()
    }
    samples: dict[str, dict[str, list[float]]] = {
        n: {"prefill_s": [], "decode_s": [], "og_prefill_s": [], "og_tokens_per_s": []} for n in graphs
    }
    for round_ in range(args.warmup + args.rounds):
        for name in graphs:
            time.sleep(args.pause)
            prefill = raw[name].prefill()
            time.sleep(args.pause)
            decode = raw[name].decode(args.decode_steps)
            time.sleep(args.pause)
            og_prefill, og_rate = genai[name].run() if round_ % args.og_every == 0 else (None, None)
            if round_ < args.warmup:
                continue
            samples[name]["prefill_s"].append(prefill)
            samples[name]["decode_s"].append(decode)
            if og_rate is not None:
                samples[name]["og_prefill_s"].append(og_prefill)
                samples[name]["og_tokens_per_s"].append(og_rate)
        log(f"round {round_ + 1}/{args.warmup + args.rounds} done")
    return samples


def summarize(samples, seconds, stages, args) -> tuple[str, dict]:
    med = {n: {k: statistics.median(v) if v else float("nan") for k, v in s.items()} for n, s in samples.items()}
    ref = med["builder"]
    lines = [
        f"machine: {machine()}; onnxruntime {_version('onnxruntime')}, onnxruntime-genai "
        f"{_version('onnxruntime_genai')}; {_where(args)}; medians of {args.rounds} alternated "
        f"rounds; prefill 1x{args.seq}, decode = one step after {args.seq}, og = {args.og_tokens} tokens "
        f"after a {args.seq}-token prompt",
        "",
        "| graph | prefill ms | vs builder | decode ms | vs builder | og tokens/s | vs builder | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        build = seconds.get(name)
        lines.append(
            f"| {name} | {m['prefill_s'] * 1e3:.1f} | {m['prefill_s'] / ref['prefill_s']:.2f} | "
            f"{m['decode_s'] * 1e3:.2f} | {m['decode_s'] / ref['decode_s']:.2f} | {m['og_tokens_per_s']:.1f} | "
            f"{m['og_tokens_per_s'] / ref['og_tokens_per_s']:.2f} | {'' if build is None else f'{build:.0f}'} |"
        )
    if stages:
        names = list(max(stages.values(), key=len))  # the stages in the order they ran (the adapted export has all)
        lines += ["", "Our exports' stages (seconds):", "", "| graph | " + " | ".join(names) + " | total |"]
        lines.append("|---" * (len(names) + 2) + "|")
        for name, row in stages.items():
            cells = " | ".join(f"{row[stage]:.1f}" if stage in row else "–" for stage in names)
            lines.append(f"| {name} | {cells} | {sum(row.values()):.1f} |")
    result = {
        "machine": machine(),
        "args": vars(args),
        "medians": med,
        "build_seconds": seconds,
        "export_stages": stages,
        "samples": samples,
    }
    return "\n".join(lines), result


def _where(args) -> str:
    """What ran the graphs: CPU threads and fp32, or the GPU's name and fp16."""
    if args.device != "cuda":
        return f"fp32 on the CPU, {args.threads} intra-op threads"
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        gpu = "a CUDA GPU"
    return f"fp16 on {gpu} (CUDA execution provider)"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/bench-serving", help="folder for the graphs (reused when there)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=5, help="decode calls averaged per round")
    parser.add_argument("--og-tokens", type=int, default=32)
    parser.add_argument("--og-every", type=int, default=1, help="og end-to-end every Nth round (it is the slow part)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between timings (ORT threads spin)")
    parser.add_argument("--only", help="comma-separated graph names to time (default: all five)")
    parser.add_argument("--moe", action="store_true", help="also build and time 'ours malora moe' (--moe-kernel)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: fp16 graphs on the CUDA execution provider"
    )
    parser.add_argument("--build-only", action="store_true", help="build the graphs, time nothing")
    parser.add_argument("--json", help="write medians, samples and build times here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    graphs, seconds, stages = build_all(work, moe=args.moe, device=args.device)
    seconds = remember(work / "build_seconds.json", seconds)
    stages = {k: v for k, v in remember(work / "export_stages.json", stages).items() if v is not None}
    if args.build_only:
        return 0
    if args.only:
        keep = [n.strip() for n in args.only.split(",")]
        graphs = {n: p for n, p in graphs.items() if n in keep or n == "builder"}
    samples = measure(graphs, args)
    table, result = summarize(samples, seconds, stages, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
