"""``malora-fx sweep`` (run a quality sweep, resumable) and ``malora-fx sweep-report`` (redraw its report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub) -> None:
    """``sweep`` and ``sweep-report``."""
    p = sub.add_parser(
        "sweep",
        help="run a quality sweep (models x suites x methods x ranks x lrs x steps x seeds), resumable",
        description="Run every cell of SPEC (TOML or JSON) not yet in OUT/results.jsonl: transform, train, "
        "evaluate; then write OUT/results.md and plots. Run the same command again to resume. With "
        "lr_search_seeds = K in SPEC, every lr runs on the first K seeds and the later seeds at the lr chosen "
        "on the validation split.",
    )
    p.add_argument("spec", help="sweep spec, .toml or .json (see examples/sweep/)")
    p.add_argument("--out", required=True, help="sweep directory (new, empty, or an earlier run of a sweep)")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and list its cells; run nothing")
    p.add_argument(
        "--from-results",
        metavar="FILE",
        help="count the cells finished in FILE (a copy of a sweep's results.jsonl, e.g. a committed one) as "
        "finished in --out, then run the rest",
    )
    p.add_argument("--no-report", action="store_true", help="do not write results.md and the plots at the end")
    p.add_argument(
        "--device",
        help="train and evaluate every cell on this device (cpu, cuda, cuda:N) instead of the spec's [train] device",
    )
    p.add_argument("--methods", help="run only these method labels of the spec (comma-separated)")
    p.add_argument("--suites", help="run only these suites of the spec (comma-separated)")
    p.add_argument(
        "--seeds",
        help="run only these seeds of the spec (comma-separated), e.g. the later seeds of an lr search whose "
        "first seed ran elsewhere",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="run only shard I of N (every N-th cell from the I-th); N processes can share one --out, e.g. on "
        "one GPU; no report is written (run sweep-report when all are done); on a CPU set OMP_NUM_THREADS to "
        "cores / N for each, as --jobs does",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run the cells in N processes at once (shards sharing --out, each with OMP_NUM_THREADS = cores / N "
        "unless set; e.g. 8-16 for a small model on one GPU), then write the report",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "sweep-report",
        help="write results.md and the plots of a sweep directory from its results.jsonl",
        description="Aggregate DIR/results.jsonl (mean ± std over seeds; lr chosen on the validation split) "
        "into DIR/results.md, DIR/methods.png, DIR/rank_sweep.png and DIR/params_vs_accuracy.png.",
    )
    p.add_argument("dir", help="sweep directory (the --out of malora-fx sweep)")
    p.set_defaults(func=cmd_sweep_report)


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..errors import MaloraError
    from ..training.sweep import (
        RESULTS,
        Cell,
        import_results,
        load_spec,
        only_seeds,
        parse_seeds,
        parse_shard,
        plan_counts,
        read_results,
        run_sweep,
        shard_cells,
        slots,
        with_device,
        with_methods,
        with_suites,
    )

    if args.jobs != 1 and args.shard and not args.dry_run:
        raise MaloraError("--jobs and --shard: choose one (--jobs starts the shards itself)")
    spec = load_spec(args.spec)
    if args.device:
        spec = with_device(spec, args.device)
    imported = None
    if args.from_results:  # the whole spec's cells, before --methods/--suites narrow what runs
        imported = import_results(args.out, args.from_results, spec, write=not args.dry_run)
    if args.jobs != 1 and not args.dry_run:
        from ..training.sweep_jobs import run_jobs

        rows = run_jobs(
            args.spec,
            args.out,
            args.jobs,
            device=args.device,
            methods=args.methods,
            suites=args.suites,
            seeds=args.seeds,
            report=not args.no_report,
        )
        print(f"{len(rows)} finished cells in {Path(args.out) / RESULTS}")
        return 0
    shard = parse_shard(args.shard) if args.shard else None
    if args.methods:
        spec = with_methods(spec, args.methods)
    if args.suites:
        spec = with_suites(spec, args.suites)
    seeds = parse_seeds(spec, args.seeds) if args.seeds else None
    if args.dry_run:
        rows = imported if imported is not None else read_results(Path(args.out) / RESULTS)
        done = {r["id"] for r in rows}
        plan = shard_cells(only_seeds(slots(spec, rows), seeds), shard)
        for slot in plan:
            print(
                f"{'done' if slot.id in done else 'todo'}  {slot.id}"
                if isinstance(slot, Cell)
                else f"wait  {slot.name}"
            )
        finished, to_run, waiting = plan_counts(plan, done)
        line = f"{len(plan)} cells, {finished} done, {to_run} to run"
        print(line + (f", {waiting} waiting for the lr choice on the first seeds" if waiting else ""))
        return 0
    report = not args.no_report and shard is None
    rows = run_sweep(
        spec, args.out, report=report, shard=shard, only_own_cells=bool(args.methods or args.suites), seeds=seeds
    )
    print(f"{len(rows)} finished cells in {Path(args.out) / RESULTS}")
    if report:
        print(f"report: {Path(args.out) / 'results.md'}")
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from ..training.sweep_report import write_report

    for path in write_report(args.dir):
        print(path)
    return 0
