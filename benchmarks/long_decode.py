"""Decode time per token against context length on Gemma-3-270m (hybrid sliding/global attention).

The real Gemma-3-270m (`--model gemma3-270m`) and its shipped indexer decode at a 10% budget from
histories of 4K to 32K tokens. A CPU prefill of 32K tokens takes the better part of an hour, so
the three global layers' history is synthetic post-RoPE K/V in the host mirror and the sliding
layers' rings hold random K/V; the model's own one-token forward gives the activations of the
first selection (as benchmarks/synthetic.py does for the Llama shapes). Speed does not depend on
the values. Every context decodes its timed window (one cycle of tau steps, so it spans one
boundary: selection, recall) once per round, contexts taking turns, so each sees the same load;
the report gives the median over rounds and the ratio to the shortest context.

    python benchmarks/long_decode.py                                  # 4K, 8K, 16K, 32K; ~10 min on 2 cores
    python benchmarks/long_decode.py --policy quest --out benchmarks/results/long_decode_gemma_quest
    python benchmarks/long_decode.py --contexts 4096 8192 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import synthetic_history, synthetic_prefill  # noqa: E402

from flashmemory import LSAConfig, LSAEngine, load_backbone  # noqa: E402
from flashmemory.policies import policy_names  # noqa: E402

MODEL = "gemma3-270m"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32512])
    p.add_argument("--budget", type=float, default=0.10, help="resident share of the global layers' history")
    p.add_argument("--policy", default="lsa", choices=[n for n in policy_names() if n != "deepseek-lsa"], help="lsa (its shipped indexer keeps what it predicts, up to the "
                   "budget) or a policy that fills the budget, e.g. quest")
    p.add_argument("--rounds", type=int, default=3, help="timed windows per context (their median is reported)")
    p.add_argument("--warmup", type=int, default=4, help="steps before timing (the first boundary builds the index)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "long_decode_gemma")
    args = p.parse_args()
    model = load_backbone(MODEL)
    config = LSAConfig(budget=args.budget)
    env = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}
    print(env, flush=True)
    steps = config.tau
    room = args.warmup + args.rounds * steps + 2
    # one engine per context on the one model, stepped in turn: each times one cycle per round
    engines = {c: LSAEngine(model, config) for c in args.contexts}
    try:
        seqs, times = {}, {c: [] for c in args.contexts}
        for i, (context, engine) in enumerate(engines.items()):
            history = synthetic_history(engine, context, room + 64, seed=i)
            seqs[context] = engine.submit_prefilled(synthetic_prefill(engine, history, context, room, seed=i), args.policy,
                                                    max_new_tokens=room, stop_at_eos=False)
            for _ in range(args.warmup):  # the first boundary: the key store over the whole history
                engine.step()
        for _ in range(args.rounds):
            for context, engine in engines.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                times[context].append(1000 * (time.perf_counter() - t0) / steps)
        rows = []
        base = statistics.median(times[args.contexts[0]])
        for context, seq in seqs.items():
            ms = statistics.median(times[context])
            rows.append({"context": context, "ms_per_token": ms, "rounds_ms": times[context], "ratio": ms / base,
                         "resident_fraction": seq.attended / seq.length, "cycles": len(seq.cycles),
                         "device_kv_bytes_peak": seq.memory.device_kv_bytes_peak, "full_kv_bytes": seq.full_kv_bytes})
            engines[context].cancel(seq)
    finally:
        for engine in engines.values():
            engine.close()
    report = {"env": env, "model": MODEL, "policy": args.policy, "budget": args.budget, "rows": rows, "target": 1.2}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = markdown(report, " ".join(sys.argv[1:]))
    args.out.with_suffix(".md").write_text(md)
    print(md)


def markdown(r: dict, argv: str) -> str:
    e = r["env"]
    lines = [f"# {r['policy']} decode against context length: {r['model']}, {r['budget']:.0%} budget", "",
             f"`python benchmarks/long_decode.py {argv}`".replace(" `", "`"), "",
             f"{e['machine']}, {e['threads']} torch threads, torch {e['torch']}, load average at start "
             f"{e['load_average'][0]:.1f}, {e['date']}; the real model and shipped indexer, synthetic global-layer "
             "history, one cycle (64 steps, one boundary) timed per round, median of rounds.", "",
             "| context | ms/token | / shortest | resident (global layers) | rounds (ms/token) |",
             "|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['context']:,} | {row['ms_per_token']:.1f} | {row['ratio']:.2f}x | "
                     f"{row['resident_fraction']:.1%} | {', '.join(f'{t:.1f}' for t in row['rounds_ms'])} |")
    last = r["rows"][-1]
    lines += ["", f"**{last['context']:,} tokens against {r['rows'][0]['context']:,}: {last['ratio']:.2f}x** "
              f"(target <= {r['target']}x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
