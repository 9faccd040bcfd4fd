"""Target-layer search: validation recall against the number of target layers (a small Pareto sweep).

1. every candidate layer alone;
2. for k = 2 .. max_layers: the `beam` best sets of size k-1, each extended by one of the
   `width` best single layers it lacks (a beam search; the paper ran ~500 full runs instead);
3. the Pareto front of (layers, recall) and the pick: the smallest set whose recall is within
   `tolerance` of the best recall found (0 by default: the best set).
The recall is measured at the budget on the validation documents: all of them
(metric="all") or only the question documents (metric="qa", the default), whose anchors
are retrieval events (the model reads a fact back), where sparse selection matters most.
Every run is a short training on the same dump, scored on the same validation documents.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .dataset import TraceSet, select_layers
from .train import TrainConfig, train_indexer


@dataclass
class SearchRun:
    layers: list[int]
    recall_at_budget: float
    recall_at_k: dict
    f1: float | None
    seconds: float


@dataclass
class SearchResult:
    runs: list[SearchRun] = field(default_factory=list)
    pareto: list[SearchRun] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    quest_recall_at_budget: float | None = None
    seconds: float = 0.0
    metric: str = "qa"

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "metric": self.metric, "seconds": round(self.seconds, 1),
                "quest_recall_at_budget": self.quest_recall_at_budget,
                "pareto": [asdict(r) for r in self.pareto],
                "runs": sorted((asdict(r) for r in self.runs), key=lambda r: (len(r["layers"]), -r["recall_at_budget"]))}


def pareto_front(runs: list[SearchRun]) -> list[SearchRun]:
    """Best run per set size, kept only while recall strictly improves with more layers."""
    best: dict[int, SearchRun] = {}
    for r in runs:
        k = len(r.layers)
        if k not in best or r.recall_at_budget > best[k].recall_at_budget:
            best[k] = r
    front, top = [], -1.0
    for k in sorted(best):
        if best[k].recall_at_budget > top:
            front.append(best[k])
            top = best[k].recall_at_budget
    return front


def search_layers(traces: TraceSet, candidates: list[int] | None = None, max_layers: int = 3, beam: int = 3,
                  width: int = 5, tolerance: float = 0.0, base: TrainConfig | None = None,
                  log=None, metric: str = "qa") -> SearchResult:
    """Run the sweep on a TraceSet loaded with (at least) the candidate layers."""
    start = time.perf_counter()
    candidates = list(candidates or traces.layers)
    base = base or TrainConfig(epochs=15, patience=4)
    if metric not in ("qa", "all"):
        raise ValueError(f"metric must be 'qa' or 'all', got {metric!r}")
    result = SearchResult(metric=metric)
    seen: dict[tuple[int, ...], SearchRun] = {}

    def run(layers: list[int]) -> SearchRun:
        key = tuple(sorted(layers))
        if key in seen:
            return seen[key]
        t = time.perf_counter()
        view = select_layers(traces, list(key))
        cfg = TrainConfig(**{**asdict(base), "layers": list(key)})
        res = train_indexer(view, cfg)
        v = res.val_qa if metric == "qa" and res.val_qa is not None else res.val
        r = SearchRun(list(key), v.recall_at_budget, {str(k): x for k, x in v.recall_at_k.items()}, v.f1,
                      round(time.perf_counter() - t, 1))
        seen[key] = r
        result.runs.append(r)
        if result.quest_recall_at_budget is None and res.val_quest is not None and metric == "all":
            result.quest_recall_at_budget = res.val_quest.recall_at_budget
        if log:
            log(f"layers {list(key)}: recall@budget {r.recall_at_budget:.3f}  ({r.seconds:.0f} s)")
        return r

    singles = sorted((run([c]) for c in candidates), key=lambda r: -r.recall_at_budget)
    top_singles = [r.layers[0] for r in singles[:width]]
    frontier = singles[:beam]
    for _k in range(2, max_layers + 1):
        grown = []
        for r in frontier:
            for c in top_singles:
                if c not in r.layers:
                    grown.append(run(r.layers + [c]))
        if not grown:
            break
        frontier = sorted(grown, key=lambda r: -r.recall_at_budget)[:beam]
    result.pareto = pareto_front(result.runs)
    best = max(r.recall_at_budget for r in result.runs)
    result.chosen = next(r.layers for r in result.pareto if r.recall_at_budget >= best - tolerance)
    result.seconds = time.perf_counter() - start
    return result
