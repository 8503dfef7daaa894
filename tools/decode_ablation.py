"""Where a routed export's extra decode time goes, by ablation rather than by profiler.

onnxruntime's profiler adds its own cost to every node it times: on SmolLM2's MALoRA export
(2,095 nodes) its kernel times summed to 45 ms for a decode step that takes 33 ms unprofiled, and
a Mul of 8 floats showed 7 us where a chain of them runs at ~0.5 us each. Small nodes look
expensive there, so ``tools/profile_ort.py`` cannot say how much the routing costs. This tool times instead, alternated
in one process, three graphs that differ by one part each:

* ``base``        our base export (``malora-fx export --base-only``), given with ``--base``;
* ``exported``    the routed export as it is;
* ``no routing``  the same with every site's gating removed: the expert coefficients ``h`` go
                  to the up-projection ungated, so Softmax, TopK, the zeros Mul, ScatterElements,
                  the spread MatMul and the gate Mul of every site are gone (wrong outputs, same GEMMs).

Differences of the medians attribute the export's extra time: routing nodes = exported - no
routing (a chain that ``group_routing`` shares between sites counts once); the adapters' GEMMs
(routers, shared down-projections, per-expert and up-projections: their weight bytes) = no
routing - base. Needs a routed export (MALoRA, MoLoRA, HydraLoRA) and
our base export of the same model. Read differences under ~1 ms with care: on a 2-core VM two
identical graphs differ by that much between runs.

    python tools/decode_ablation.py runs/bench-serving/ours-malora --base runs/bench-serving/ours-base \\
        --json tools/results/decode_ablation.json --markdown tools/results/decode_ablation.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import onnx
from bench_serving import RawSession, machine  # tools/ is on sys.path when this file runs as a script
from onnx import numpy_helper

from malora_fx.deploy.onnx_passes._routing import spread_shape


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def is_spread(init: onnx.TensorProto) -> int:
    """N·r when ``init`` is a routed site's (or group's) 0/1 spread matrix ``[N, N·r]``, else 0."""
    dims = list(init.dims)
    if len(dims) != 2 or dims[0] * dims[1] > 1 << 20:  # not converted: far larger than any spread matrix
        return 0
    shape = spread_shape(numpy_helper.to_array(init))
    return shape[0] * shape[1] if shape is not None else 0


def gate_muls(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """{gated output: (ungated h, N·r)} for every ``h * (g @ spread)`` of a routed site or group."""
    made = producers(graph)
    inits = {init.name: init for init in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for h, spread in (node.input, node.input[::-1]):
            source = made.get(spread)
            if source is not None and source.op_type == "MatMul" and source.input[1] in inits:
                width = is_spread(inits[source.input[1]])
                if width:
                    found[node.output[0]] = (h, width)
    return found


def prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes no graph output depends on (onnxruntime would run them)."""
    needed = {out.name for out in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = needed
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def without_routing(model: onnx.ModelProto) -> int:
    """Feed each site's up-projection ``h`` instead of the gated ``h * (g @ spread)``; sites changed."""
    gated = gate_muls(model.graph)
    changed = 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in gated:
                node.input[i] = gated[name][0]
                changed += 1
    prune(model.graph)
    return changed


def write_variant(src: Path, dst: Path, edit) -> int:
    """Write export ``src`` to ``dst`` with ``edit`` applied to its graph; the sites it changed."""
    model = onnx.load(str(src / "model.onnx"))
    changed = edit(model)
    if not changed:
        raise SystemExit(f"decode_ablation: {src}: no routed site found (a MALoRA, MoLoRA or HydraLoRA export?)")
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name not in ("model.onnx", "model.onnx.data") and item.is_file():
            shutil.copy(item, dst / item.name)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="a routed export folder (malora-fx export)")
    parser.add_argument("--base", type=Path, required=True, help="our base export of the same model (--base-only)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"base": args.base, "exported": args.export}
        sites = write_variant(args.export, Path(tmp, "no-routing"), without_routing)
        folders["no routing"] = Path(tmp, "no-routing")
        nodes = {
            k: len(onnx.load(str(f / "model.onnx"), load_external_data=False).graph.node) for k, f in folders.items()
        }
        sessions = {k: RawSession(f, args.threads, args.seq) for k, f in folders.items()}
        times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in sessions}
        for _ in range(args.rounds):
            for key, session in sessions.items():
                times[key]["prefill"].append(session.prefill())
                times[key]["decode"].append(session.decode(args.decode_steps))
    med = {k: {m: statistics.median(v) * 1e3 for m, v in d.items()} for k, d in times.items()}
    parts = {
        "routing nodes (Softmax, TopK, Mul, ScatterElements, spread MatMul, gate Mul)": ("exported", "no routing"),
        "adapter GEMMs (routers, shared down, per-expert, up-projections)": ("no routing", "base"),
    }
    where = f"{machine()}; {args.threads} intra-op threads"
    lines = [
        f"machine: {where}; {sites} routed sites; medians of {args.rounds} alternated rounds; "
        f"decode = one step after {args.seq} tokens, prefill 1 x {args.seq}",
        "",
        "| graph | nodes | prefill ms | decode ms |",
        "|---|---|---|---|",
        *(f"| {k} | {nodes[k]} | {med[k]['prefill']:.1f} | {med[k]['decode']:.2f} |" for k in med),
        "",
        f"Extra decode time of the export over base: {med['exported']['decode'] - med['base']['decode']:.2f} ms",
        "",
        "| part | nodes | decode ms |",
        "|---|---|---|",
        *(
            f"| {part} | {nodes[a] - nodes[b]} | {med[a]['decode'] - med[b]['decode']:.2f} |"
            for part, (a, b) in parts.items()
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        record = {"machine": where, "sites": sites, "nodes": nodes, "median_ms": med, "rounds": args.rounds}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
