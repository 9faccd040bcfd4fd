"""Turning per-sample records into the Table-1 report: Markdown, JSON and a PNG plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .harness import EvalRun

AVERAGE = "average"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _row(task: str, policy: str, budget: float, recs: list[dict]) -> dict:
    ok = [r for r in recs if r.get("error") is None]
    reports = [r["report"] for r in ok]
    tr = [rep.get("transfers", {}) for rep in reports]
    return {
        "task": task, "policy": policy, "budget": budget, "samples": len(recs), "errors": len(recs) - len(ok),
        "error_messages": sorted({r["error"] for r in recs if r.get("error")}),
        "accuracy": None if not ok else 100.0 * _mean([r["score"] for r in ok]),
        "resident_fraction_mean": _mean([rep["resident_fraction_mean"] for rep in reports]),
        "resident_fraction_max": max((rep["resident_fraction_max"] for rep in reports), default=None),
        "device_kv_bytes_mean": _mean([rep["device_kv_bytes_peak"] for rep in reports]),
        "device_kv_bytes_max": max((rep["device_kv_bytes_peak"] for rep in reports), default=None),
        "full_kv_bytes_mean": _mean([rep["full_kv_bytes"] for rep in reports]),
        # records cached before the index was measured have no figure
        "index_bytes_mean": _mean([rep["index_bytes"] for rep in reports if "index_bytes" in rep]),
        "decode_ms_per_token": _mean([rep["decode_ms_per_token"] for rep in reports]),
        "recalls": _mean([t.get("recalls", 0) for t in tr]),
        "recall_bytes": _mean([t.get("recall_bytes", 0) for t in tr]),
        "offloads": _mean([t.get("offloads", 0) for t in tr]),
        "offload_bytes": _mean([t.get("offload_bytes", 0) for t in tr]),
        "prefill_seconds": _mean([r["prefill_seconds"] for r in recs]),
    }


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task, policy, budget), then one `average` row per (policy, budget) over tasks."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["policy"], r["budget"])].append(r)
    rows = [_row(t, p, b, recs) for (t, p, b), recs in groups.items()]
    by_run: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_run[(row["policy"], row["budget"])].append(row)
    for (policy, budget), task_rows in by_run.items():
        avg = {"task": AVERAGE, "policy": policy, "budget": budget,
               "samples": sum(r["samples"] for r in task_rows), "errors": sum(r["errors"] for r in task_rows),
               "error_messages": sorted({m for r in task_rows for m in r["error_messages"]})}
        ok = [r for r in task_rows if r["accuracy"] is not None]
        # macro average over tasks (as RULER reports), only over tasks where the policy ran
        for k in ("accuracy", "resident_fraction_mean", "device_kv_bytes_mean", "full_kv_bytes_mean", "index_bytes_mean",
                  "decode_ms_per_token", "recalls", "recall_bytes", "offloads", "offload_bytes", "prefill_seconds"):
            avg[k] = _mean([r[k] for r in ok if r[k] is not None])
        for k in ("resident_fraction_max", "device_kv_bytes_max"):
            avg[k] = max((r[k] for r in ok if r[k] is not None), default=None)
        rows.append(avg)
    return rows


def position_rows(records: list[dict]) -> list[dict]:
    """Multi-question records: accuracy by question position, one row per (policy, budget, position), over
    every task and sample; with the extra forward seconds a policy spent per conversation (kvzip's
    reconstruction) and their ratio to the document's prefill."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    conversations: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("turns"):
            conversations[(r["policy"], r["budget"])].append(r)
            for t in r["turns"]:
                groups[(r["policy"], r["budget"], t["position"])].append(t)
    rows = []
    for (policy, budget, position), turns in sorted(groups.items()):
        convs = conversations[(policy, budget)]
        rows.append({"policy": policy, "budget": budget, "position": position, "questions": len(turns),
                     "accuracy": 100.0 * _mean([t["score"] for t in turns]),
                     "resident_fraction_max": max(t["report"]["resident_fraction_max"] for t in turns),
                     "scoring_forward_seconds": _mean([c["scoring_forward_seconds"] for c in convs]),
                     "scoring_prefill_ratio": _mean([c["scoring_prefill_ratio"] for c in convs
                                                     if c.get("scoring_prefill_ratio") is not None])})
    return rows


def _positions_markdown(run: EvalRun, rows: list[dict]) -> list[str]:
    if not rows:
        return []
    sweep = len(run.settings.budgets) > 1
    positions = sorted({r["position"] for r in rows})
    runs = sorted({(r["policy"], r["budget"]) for r in rows},
                  key=lambda k: (run.settings.policies.index(k[0]), k[1]))
    cell = {(r["policy"], r["budget"], r["position"]): r for r in rows}
    lines = ["", "## Many questions on one context: accuracy (%) by question position", "",
             "Each sample's document is prefilled once; its questions are asked one after another, each "
             "appended after the previous answer. Extra forward: seconds per conversation a policy spent on "
             "forward passes of its own (kvzip's context reconstruction), and their ratio to the document's prefill.",
             "", "| policy | " + " | ".join(f"question {p}" for p in positions) + " | questions | resident max | "
             "extra forward |", "|---|" + "---|" * (len(positions) + 3)]
    for p, b in runs:
        got = [cell.get((p, b, i)) for i in positions]
        first = next(r for r in got if r is not None)
        extra = "-" if not first["scoring_forward_seconds"] else \
            f"{first['scoring_forward_seconds']:.1f} s ({_num(first['scoring_prefill_ratio'], '{:.2f}')}x prefill)"
        lines.append(f"| {_label(p, b, sweep)} | " + " | ".join("-" if r is None else f"{r['accuracy']:.1f}"
                                                                for r in got) +
                     f" | {sum(r['questions'] for r in got if r)} | "
                     f"{_pct(max(r['resident_fraction_max'] for r in got if r))} | {extra} |")
    return lines


def _label(policy: str, budget: float, sweep: bool) -> str:
    return policy if (budget >= 1.0 and policy == "full") or not sweep else f"{policy}@{budget:g}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def to_markdown(run: EvalRun, rows: list[dict]) -> str:
    """Table 1 (accuracy and mean resident fraction per task x policy), details, failures."""
    s = run.settings
    sweep = len(s.budgets) > 1
    tasks = [t for t in s.tasks] + [AVERAGE]
    runs = []
    for r in rows:
        key = (r["policy"], r["budget"])
        if key not in runs:
            runs.append(key)
    runs.sort(key=lambda k: (s.policies.index(k[0]), k[1]))
    cell = {(r["task"], r["policy"], r["budget"]): r for r in rows}
    cfg = s.config
    lines = [
        "# FlashMemory evaluation", "",
        f"model `{run.model}`, length {s.length} tokens, {s.samples} sample(s) per task, seed {s.seed}, "
        f"chat template {'on' if s.chat else 'off'}; budget{'s' if sweep else ''} "
        f"{', '.join(f'{b:g}' for b in s.budgets)} of the history's KV; chunk {cfg.chunk_size}, page "
        f"{cfg.page_size}, tau {cfg.tau}, sink {cfg.sink_tokens}, tail {cfg.tail_tokens} tokens.", "",
        "## Table 1: accuracy (%) and mean resident KV fraction", "",
        "| task | " + " | ".join(_label(p, b, sweep) for p, b in runs) + " |",
        "|---|" + "---|" * len(runs)]
    for t in tasks:
        cells = []
        for p, b in runs:
            r = cell.get((t, p, b))
            if r is None:
                cells.append("-")
            elif r["accuracy"] is None:
                cells.append("error")
            else:
                mark = "*" if r["errors"] else ""
                cells.append(f"{r['accuracy']:.1f}{mark} ({_pct(r['resident_fraction_mean'])})")
        name = f"**{t}**" if t == AVERAGE else t
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(r["errors"] and r["accuracy"] is not None for r in rows):
        lines += ["", "`*`: some samples failed for this policy (see Failures); accuracy is over the samples that ran."]
    lines += ["", "## Details", "",
              "| task | policy | budget | n | accuracy | resident mean | resident max | device KV mean | "
              "device KV max | full KV | index | decode ms/tok | recalls | recalled | offloads | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for p, b in runs:
            r = cell.get((t, p, b))
            if r is None:
                continue
            lines.append(
                f"| {t} | {p} | {b:g} | {r['samples']} | {_num(r['accuracy'])} | {_pct(r['resident_fraction_mean'])} | "
                f"{_pct(r['resident_fraction_max'])} | {_bytes(r['device_kv_bytes_mean'])} | "
                f"{_bytes(r['device_kv_bytes_max'])} | {_bytes(r['full_kv_bytes_mean'])} | {_bytes(r['index_bytes_mean'])} | "
                f"{_num(r['decode_ms_per_token'], '{:.0f}')} | {_num(r['recalls'])} | {_bytes(r['recall_bytes'])} | "
                f"{_num(r['offloads'])} | {r['errors']} |")
    errors = sorted({(r["policy"], r["budget"], m) for r in rows for m in r["error_messages"]})
    if errors:
        lines += ["", "## Failures", ""]
        lines += [f"- {p} @ {b:g}: {m}" for p, b, m in errors]
    lines += _positions_markdown(run, position_rows(run.records))
    prefill = [r["prefill_seconds"] for r in rows if r["task"] == AVERAGE and r["prefill_seconds"] is not None]
    lines += ["", f"Mean prefill {prefill[0]:.1f} s per sample (shared by all policies)." if prefill else "",
              "Resident fraction: device KV tokens / history tokens (sink, tail and the current cycle included), "
              "mean over cycles, then over samples; max over both. Transfers are per sample. "
              "Index: the policy's own per-chunk metadata (lsa's key store, quest's key min/max), not counted as KV."]
    return "\n".join(lines) + "\n"


def to_json(run: EvalRun, rows: list[dict]) -> dict:
    """Settings, summary rows, every per-sample record and the samples' ids, depths and answers."""
    return {"model": run.model, "settings": run.settings.to_dict(), "summary": rows,
            "positions": position_rows(run.records), "records": run.records,
            "samples": [{"id": s.id, "task": s.task, "depth": s.depth, "target_length": s.target_length,
                         "answers": s.answers, "metric": s.metric, "max_new_tokens": s.max_new_tokens}
                        for s in run.samples]}


def plot(run: EvalRun, rows: list[dict], path: Path) -> None:
    """Accuracy against mean resident fraction (task average), one line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for policy in run.settings.policies:
        pts = sorted((r["resident_fraction_mean"], r["accuracy"]) for r in rows
                     if r["task"] == AVERAGE and r["policy"] == policy and r["accuracy"] is not None
                     and r["resident_fraction_mean"] is not None)
        if not pts:
            continue
        xs, ys = [100 * x for x, _ in pts], [y for _, y in pts]
        line, = ax.plot(xs, ys, marker="o", linestyle="-", label=policy)
        if policy == "full":  # one point at 100%: also draw it as a reference level
            ax.axhline(ys[0], color=line.get_color(), linestyle=":", alpha=0.6)
    ax.set_xlabel("mean resident KV (% of history)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_xlim(0, 105)
    ax.grid(alpha=0.3)
    tasks = run.settings.tasks
    what = ", ".join(tasks) if len(tasks) <= 3 else f"average of {len(tasks)} tasks"
    ax.set_title(f"{what} @ {run.settings.length} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run: EvalRun, out_dir: Path, json_out: Path | None = None) -> dict[str, Path]:
    """Write report.md, report.json (or `json_out`) and accuracy_vs_resident.png; return their paths."""
    rows = summarize(run.records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "json": Path(json_out) if json_out else out_dir / "report.json",
             "plot": out_dir / "accuracy_vs_resident.png"}
    paths["markdown"].write_text(to_markdown(run, rows), encoding="utf-8")
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(to_json(run, rows), indent=1), encoding="utf-8")
    plot(run, rows, paths["plot"])
    return paths
