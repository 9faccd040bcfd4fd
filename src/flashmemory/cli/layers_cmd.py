"""`flashmemory layers`: rank target-layer sets by validation recall against the number of layers."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import HelpFormatter, USER_ERRORS, fail


def register(sub) -> None:
    p = sub.add_parser(
        "layers", help="search the indexer's target layers (recall vs. number of layers, a Pareto sweep)",
        description="Train short indexers on single candidate layers, then grow the best sets one layer at a time "
                    "(beam search). Prints every run, the Pareto front and the chosen set: the smallest one within "
                    "--tolerance of the best recall. Needs a dump made with those candidate layers.",
        formatter_class=HelpFormatter)
    p.add_argument("--dump", nargs="+", required=True, help="dump folder(s)")
    p.add_argument("--candidates", default="all", help="candidate layers (all: the dump's), e.g. 3-27 or 6,9,12")
    p.add_argument("--max-layers", type=int, default=3, help="largest set size to try")
    p.add_argument("--beam", type=int, default=3, help="sets kept per size")
    p.add_argument("--width", type=int, default=5, help="best single layers used to grow sets")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="validation recall a smaller set may lose and still be chosen (0: the best set)")
    p.add_argument("--metric", choices=["qa", "all"], default="qa",
                   help="validation recall on question documents (retrieval events) or on all documents")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run")
    p.add_argument("--heads", type=int, default=None, help="indexer heads (default: as `flashmemory train`)")
    p.add_argument("--q-rank", type=int, default=64)
    p.add_argument("--min-layers", type=int, default=None, help="golden vote threshold (default: the dump's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the full report as JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..traces.dataset import TraceError, TraceSet, common_candidate_layers
    from ..traces.dump import DumpError, parse_layers
    from ..traces.search import search_layers
    from ..traces.train import TrainConfig, TrainError

    try:
        if args.max_layers < 1 or args.beam < 1 or args.width < 1:
            raise TrainError("--max-layers, --beam and --width must be at least 1")
        cands = parse_layers(args.candidates) or common_candidate_layers(args.dump)
        traces = TraceSet(args.dump, layers=cands)
        base = TrainConfig(n_heads=args.heads, q_rank=args.q_rank, epochs=args.epochs, patience=4,
                           min_layers=args.min_layers, seed=args.seed)
        log = None if args.json else print
        result = search_layers(traces, cands, args.max_layers, args.beam, args.width, args.tolerance, base, log,
                               metric=args.metric)
    except (TraceError, DumpError, TrainError, *USER_ERRORS) as exc:
        return fail(str(exc))
    report = result.to_dict()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Pareto front (layers -> validation recall at the budget, {args.metric} documents):")
    for r in result.pareto:
        print(f"  {len(r.layers)} layer(s) {r.layers}: {r.recall_at_budget:.3f}")
    if result.quest_recall_at_budget is not None:
        print(f"  (training-free quest on the same anchors: {result.quest_recall_at_budget:.3f})")
    print(f"chosen: {','.join(map(str, result.chosen))}  ({len(result.runs)} runs, {result.seconds:.0f} s); "
          f"train with: flashmemory train --layers {','.join(map(str, result.chosen))} ...")
    return 0
