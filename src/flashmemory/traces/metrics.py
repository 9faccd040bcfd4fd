"""Validation metrics of a chunk scorer against golden labels, over the selectable population.

All counts are micro-averaged over anchors. Two recalls: over the selectable population only
(what the scorer itself finds) and over every golden chunk of the history (what the resident
set holds, sink and tail included, which is what decoding needs). "Resident fraction" is measured in complete
chunks of the anchor's history: the forced part (sink + tail, everything outside the
population) plus the chunks the scorer selects, over all complete chunks. The unfinished
page and page rounding (which the runtime adds) are not counted here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ScoreMetrics:
    anchors: int = 0
    positives: int = 0
    population: int = 0
    recall_at_k: dict = field(default_factory=dict)     # K (chunks) -> recall of positives in the top K
    recall_at_budget: float = 0.0   # top-K where K fills `budget` of the history after sink + tail
    # all golden chunks of the history (forced ones too): the share the resident set holds when
    # sink + tail + the top-K above fill `budget` (what decoding with this scorer actually keeps)
    golden: int = 0
    recall_resident: float = 0.0
    # threshold metrics (probabilistic scorers only)
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    selected_fraction: float | None = None   # share of population chunks above the threshold
    resident_fraction: float | None = None   # (forced + selected) / complete chunks, selection capped at the budget
    recall_capped: float | None = None       # recall of that capped selection (what LSA keeps)

    @property
    def positive_rate(self) -> float:
        return self.positives / max(1, self.population)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["positive_rate"] = self.positive_rate
        d["recall_at_k"] = {str(k): v for k, v in self.recall_at_k.items()}
        return d


def score_metrics(scores: list[torch.Tensor], labels: list[torch.Tensor], populations: list[torch.Tensor],
                  ks: tuple[int, ...] = (4, 8, 16, 32), budget: float = 0.10, threshold: float | None = 0.5
                  ) -> ScoreMetrics:
    """Metrics over anchors; per anchor: scores/labels/population are 1-D over its complete chunks."""
    m = ScoreMetrics()
    hits_k = {k: 0 for k in ks}
    hits_b = tp = fp = fn = 0
    sel_frac = res_frac = 0.0
    hits_cap = 0
    hits_res = 0
    for s, y, pop in zip(scores, labels, populations):
        s, y_all, pop = s.float(), y.bool(), pop.bool()
        y = y_all & pop
        n_total = pop.numel()
        if n_total == 0:
            continue
        m.anchors += 1
        cand = torch.nonzero(pop).flatten()
        n_pop = cand.numel()
        pos = int(y.sum())
        m.positives += pos
        m.population += n_pop
        forced = n_total - n_pop
        cap = max(0, int(budget * n_total) - forced)
        order = cand[torch.argsort(s[cand], descending=True, stable=True)] if n_pop else cand
        for k in ks:
            hits_k[k] += int(y[order[:k]].sum())
        found = int(y[order[:cap]].sum())
        hits_b += found
        m.golden += int(y_all.sum())
        hits_res += found + int((y_all & ~pop).sum())   # forced chunks (sink, tail) are always resident
        if threshold is not None:
            above = torch.zeros_like(pop)
            above[cand] = s[cand] > threshold
            tp += int((above & y).sum())
            fp += int((above & ~y).sum())
            fn += int((~above & y).sum())
            n_sel = int(above.sum())
            sel_frac += n_sel / max(1, n_pop)
            kept = order[: min(n_sel, cap)]   # above threshold come first in `order`
            hits_cap += int(y[kept].sum())
            res_frac += (forced + kept.numel()) / n_total
    P = max(1, m.positives)
    m.recall_at_k = {k: hits_k[k] / P for k in ks}
    m.recall_at_budget = hits_b / P
    m.recall_resident = hits_res / max(1, m.golden)
    if threshold is not None and m.anchors:
        m.precision = tp / max(1, tp + fp)
        m.recall = tp / P
        m.f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        m.selected_fraction = sel_frac / m.anchors
        m.resident_fraction = res_frac / m.anchors
        m.recall_capped = hits_cap / P
    return m
