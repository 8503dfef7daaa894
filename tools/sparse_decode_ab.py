"""Sparse top-k decode in plain ONNX ops against the dense lowering, alternated in one process.

Rewrites a routed export (``malora-fx export``, up-projections joined) so that every site reads
only its k chosen experts' rows of the up-projection ``U`` instead of all N·r of them::

    y = x @ Wᵀ + Σ_j v_j · h[idx_j] @ U[idx_j]      (j over the k chosen experts)

    R    = Gather(rows_of_expert [N, r], idx)          # [.., k, r] row numbers of U
    U_k  = Reshape(Gather(U, R), [0, 0, k·r, -1])      # [.., k·r, out] the chosen experts' rows
    h_k  = GatherElements(h, Reshape(R, [0, 0, k·r]))  # their coefficients
    a_k  = h_k * (v @ spread_k)                        # gated, [.., k·r]
    y    = x @ Wᵀ + Reshape(Unsqueeze(a_k, -2) @ U_k, [0, 0, -1])

Exact (the other experts' gates are 0). Only sites whose gated coefficients feed their joined GEMM
directly are rewritten: on an export whose q/k/v and gate/up are routed together
(``group_routing``) that leaves the down projections; the figures in docs/method.md were measured
on an export made before that pass. The gather form is applied at every token count, so its
prefill figure is not what a graph with an ``If`` on the token count would pay; its decode figure
is the question: does reading k/N of ``U`` pay for the nodes the gathers add? Prints the largest
logit difference and the decode / prefill ratios (gather form over dense), medians of alternated
rounds.

    python tools/sparse_decode_ab.py runs/bench-serving/ours-malora
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
from bench_serving import RawSession, decoder_feeds, machine  # tools/ is on sys.path as a script
from decode_ablation import gate_muls, is_spread, producers, prune, write_variant
from onnx import helper, numpy_helper

JOINED = "__up"


def routed_sites(graph: onnx.GraphProto):
    """(joined MatMul, x, h, indices, values, N·r) for every joined GEMM fed by a gated site."""
    made = producers(graph)
    gated = gate_muls(graph)
    for node in graph.node:
        concat = made.get(node.input[0]) if node.op_type == "MatMul" and node.input[1].endswith(JOINED) else None
        if concat is None or concat.op_type != "Concat" or concat.input[1] not in gated:
            continue
        h, width = gated[concat.input[1]]
        gate = made[concat.input[1]]  # h * (g @ spread)
        spread = made[next(name for name in gate.input if name != h)]
        scatter = made[spread.input[0]]  # g = ScatterElements(zeros, indices, values)
        yield node, concat.input[0], h, scatter.input[1], scatter.input[2], width


def sparse_up(model: onnx.ModelProto) -> int:
    """Rewrite every routed site's up-projection into the gather form; the sites rewritten."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    sites = list(routed_sites(graph))
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    made = producers(graph)
    for i, (joined, x, h, idx, vals, width) in enumerate(sites):
        stacked = numpy_helper.to_array(inits[joined.input[1]])
        n_in = stacked.shape[0] - width
        k = int(numpy_helper.to_array(inits[made[idx].input[1]])[0])  # TopK's k
        experts = _experts(graph, width)
        rank = width // experts
        s = f"sparse{i}"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(stacked[:n_in]), s + ".W"),
                numpy_helper.from_array(np.ascontiguousarray(stacked[n_in:]), s + ".U"),
                numpy_helper.from_array(np.arange(width, dtype=np.int64).reshape(experts, rank), s + ".rows"),
                numpy_helper.from_array(np.kron(np.eye(k), np.ones((1, rank))).astype(stacked.dtype), s + ".spread"),
                numpy_helper.from_array(np.array([0, 0, k * rank], dtype=np.int64), s + ".kr"),
                numpy_helper.from_array(np.array([0, 0, k * rank, -1], dtype=np.int64), s + ".kr_out"),
                numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), s + ".out"),
                numpy_helper.from_array(np.array([-2], dtype=np.int64), s + ".axis"),
            ]
        )
        new_nodes[joined.output[0]] = [
            helper.make_node("MatMul", [x, s + ".W"], [s + "_base"]),
            helper.make_node("Gather", [s + ".rows", idx], [s + "_R"], axis=0),
            helper.make_node("Gather", [s + ".U", s + "_R"], [s + "_U"], axis=0),
            helper.make_node("Reshape", [s + "_U", s + ".kr_out"], [s + "_Uk"]),
            helper.make_node("Reshape", [s + "_R", s + ".kr"], [s + "_Rk"]),
            helper.make_node("GatherElements", [h, s + "_Rk"], [s + "_h"], axis=-1),
            helper.make_node("MatMul", [vals, s + ".spread"], [s + "_g"]),
            helper.make_node("Mul", [s + "_h", s + "_g"], [s + "_a"]),
            helper.make_node("Unsqueeze", [s + "_a", s + ".axis"], [s + "_a4"]),
            helper.make_node("MatMul", [s + "_a4", s + "_Uk"], [s + "_y4"]),
            helper.make_node("Reshape", [s + "_y4", s + ".out"], [s + "_y"]),
            helper.make_node("Add", [s + "_base", s + "_y"], [joined.output[0]]),
        ]
    nodes = []
    for node in graph.node:
        nodes.extend(new_nodes.get(node.output[0], [node]) if node.op_type == "MatMul" else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    prune(graph)
    return len(sites)


def _experts(graph: onnx.GraphProto, width: int) -> int:
    """N, the number of experts: the rows of the spread matrix ``[N, N·r]`` of this width."""
    for init in graph.initializer:
        if is_spread(init) == width:
            return int(init.dims[0])
    raise SystemExit(f"sparse_decode_ab: no spread matrix of width {width}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="a routed export folder (MALoRA, MoLoRA, HydraLoRA)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sparse = Path(tmp, "sparse")
        sites = write_variant(args.export, sparse, sparse_up)
        sessions = {
            "dense": RawSession(args.export, args.threads, args.seq),
            "gather": RawSession(sparse, args.threads, args.seq),
        }
        feeds = decoder_feeds(sessions["dense"].session, args.export, np.random.default_rng(0), new=16, past=8)
        dense, gather = (s.session.run(None, feeds)[0] for s in sessions.values())
        times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in sessions}
        for _ in range(args.rounds):
            for key, session in sessions.items():
                times[key]["prefill"].append(session.prefill())
                times[key]["decode"].append(session.decode(args.decode_steps))
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    print(f"machine: {machine()}; {args.threads} intra-op threads; {sites} sites; {args.rounds} alternated rounds")
    largest, scale = float(np.abs(dense - gather).max()), float(np.abs(dense).max())
    print(f"max |logit difference| {largest:.2e} (max |logit| {scale:.1f})")
    for mode in ("decode", "prefill"):
        d, g = med["dense"][mode] * 1e3, med["gather"][mode] * 1e3
        print(f"{mode}: dense {d:.2f} ms, gather {g:.2f} ms, ratio {g / d:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
