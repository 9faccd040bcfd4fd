"""Many sequences at once: admission and aggregate decode throughput at one device-memory budget.

Three measurements, side by side in one run, on a random-weight backbone of a real shape with
synthetic K/V (see synthetic.py):
  1. admission and throughput: the device KV pool holds `--fulls` full caches of one context;
     as many sequences of that context as the pool admits decode together for `--steps` steps
     (the window spans a cycle boundary), for `full`, `quest` and `lsa` (the shipped indexer) at
     `--budget`; at 8K, 32K and 128K;
  2. batching efficiency: lsa's aggregate tokens/s at B = 1, 4, 16 (8K context, unbounded pool);
  3. the worst stall: the longest gap between decode steps of running sequences while a newcomer's
     real prompt is prefilled in pieces of `prefill_chunk` tokens, against its whole prefill time.

    python benchmarks/batch.py                                  # CPU, SmolLM2-135M shape (~15 min on 2 cores)
    python benchmarks/batch.py --contexts 8192 --steps 16 --batches 1 4
    python benchmarks/batch.py --device cuda --shape llama3-8b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import SHAPES, build, shipped_lsa, synchronize, synthetic_history, synthetic_prefill  # noqa: E402

from flashmemory import EngineConfig, LSAConfig, LSAEngine  # noqa: E402
from flashmemory.policies.base import reserve_pages  # noqa: E402


def policy_for(name: str, shape: str):
    return shipped_lsa() if name == "lsa" and shape == "smollm2-135m" else name


def decode_together(engine, prefills, policy, steps: int, config: LSAConfig) -> dict:
    """Start one sequence per prefill; time `steps` batched decode steps after the first (which starts the cycles)."""
    seqs = [engine.submit_prefilled(p, policy, config=config, max_new_tokens=steps + 2, stop_at_eos=False)
            for p in prefills]
    engine.step()  # admission, the first cycle of every admitted sequence, one token
    admitted = [s for s in seqs if s.admitted or s.finished]
    synchronize(engine.device)
    t0 = time.perf_counter()
    tokens = sum(len(s.output_ids) for s in admitted)
    for _ in range(steps - 1):
        engine.step()
    synchronize(engine.device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.output_ids) for s in admitted) - tokens
    used = engine.memory().device_used_bytes
    for s in seqs:
        engine.cancel(s)
    return {"admitted": len(admitted), "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / (steps - 1),
            "device_used_bytes": used}


def admission(args, device, dtype) -> list[dict]:
    rows = []
    for context in args.contexts:
        model = build(args.shape, context + args.steps + 64, device, dtype)
        bytes_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
            (getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads) * \
            torch.empty((), dtype=dtype).element_size()
        full_pages = reserve_pages(LSAConfig(budget=1.0), "all", context + args.steps + 64)  # one full sequence
        budget_bytes = int(args.fulls * full_pages * 32 * bytes_per_token)
        for name in args.policies:
            config = LSAConfig(budget=1.0 if name == "full" else args.budget)
            engine = LSAEngine(model, config, engine_config=EngineConfig(device_memory=budget_bytes, max_batch=64))
            history = synthetic_history(engine, context, args.steps + 64)
            prefills = [synthetic_prefill(engine, history, context, args.steps + 2) for _ in range(args.max_sequences)]
            r = decode_together(engine, prefills, policy_for(name, args.shape), args.steps, config)
            r.update(context=context, policy=name, device_memory=budget_bytes, full_kv_bytes=context * bytes_per_token)
            rows.append(r)
            print(f"| {context} | {name} | {budget_bytes / 2**20:.0f} MiB | {r['admitted']} | {r['tokens_per_s']:.2f} | "
                  f"{r['ms_per_step']:.0f} | {r['device_used_bytes'] / 2**20:.1f} MiB |", flush=True)
            engine.close()
            del engine, history, prefills
            gc.collect()
        del model
        gc.collect()
    return rows


def efficiency(args, device, dtype) -> list[dict]:
    context = 8192
    model = build(args.shape, context + args.steps + 64, device, dtype)
    rows = []
    for b in args.batches:
        config = LSAConfig(budget=args.budget)
        engine = LSAEngine(model, config, engine_config=EngineConfig(max_batch=max(args.batches)))
        history = synthetic_history(engine, context, args.steps + 64)
        prefills = [synthetic_prefill(engine, history, context, args.steps + 2) for _ in range(b)]
        r = decode_together(engine, prefills, policy_for("lsa", args.shape), args.steps, config)
        r.update(batch=b, context=context)
        rows.append(r)
        print(f"| lsa | {b} | {r['tokens_per_s']:.2f} | {r['ms_per_step']:.0f} | "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x |", flush=True)
        engine.close()
    return rows


def stall(args, device, dtype) -> dict:
    """Running lsa sequences at 8K keep decoding while a newcomer's real 4K-token prompt is prefilled."""
    context, prompt_len = 8192, 4096
    model = build(args.shape, context + 4 * args.steps + 64, device, dtype)
    config = LSAConfig(budget=args.budget, prefill_chunk=args.prefill_chunk)
    engine = LSAEngine(model, config)
    history = synthetic_history(engine, context, 4 * args.steps + 64)
    running = [engine.submit_prefilled(synthetic_prefill(engine, history, context, 4 * args.steps), "quest",
                                       config=config, max_new_tokens=4 * args.steps, stop_at_eos=False)
               for _ in range(4)]
    engine.step()
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    newcomer = engine.submit(prompt.tolist(), "quest", config=config, max_new_tokens=2, stop_at_eos=False)
    gaps, last = [], time.perf_counter()
    while newcomer.status.value in ("waiting", "prefill"):
        before = len(running[0].output_ids)
        engine.step()
        synchronize(engine.device)
        if len(running[0].output_ids) > before:
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    for s in running + [newcomer]:
        engine.cancel(s)
    engine.close()
    return {"prompt_tokens": prompt_len, "prefill_chunk": args.prefill_chunk, "prefill_seconds": newcomer.prefill_seconds,
            "worst_stall_seconds": max(gaps), "median_step_seconds": sorted(gaps)[len(gaps) // 2],
            "decode_steps_during_prefill": len(gaps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--policies", nargs="+", default=["full", "quest", "lsa"])
    p.add_argument("--budget", type=float, default=0.12, help="resident budget of the sparse policies")
    p.add_argument("--fulls", type=float, default=1.0, help="device KV pool = this many full caches of one context")
    p.add_argument("--max-sequences", type=int, default=16, help="sequences offered at each context")
    p.add_argument("--steps", type=int, default=66, help="decode steps per measurement (66 spans a cycle boundary)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill piece of the newcomer (stall test)")
    p.add_argument("--skip", nargs="*", default=[], choices=["admission", "efficiency", "stall"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/batch.json"))
    args = p.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build sees no CUDA device")
    if args.steps < 2:
        p.error("--steps must be at least 2")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, shape {args.shape}, {args.dtype}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "admission" not in args.skip:
        print(f"\n1. Admission and aggregate decode throughput (pool = {args.fulls:g} full cache(s) of the context)")
        print("| context | policy | device KV pool | admitted | tokens/s | ms/step | device KV used |")
        print("|---|---|---|---|---|---|---|")
        out["admission"] = admission(args, device, dtype)
        for context in args.contexts:
            rows = {r["policy"]: r for r in out["admission"] if r["context"] == context}
            if "full" in rows:
                for name in rows:
                    if name != "full":
                        print(f"{context}: {name} admits {rows[name]['admitted'] / rows['full']['admitted']:.1f}x and "
                              f"decodes {rows[name]['tokens_per_s'] / rows['full']['tokens_per_s']:.2f}x the tokens/s of full")
    if "efficiency" not in args.skip:
        print("\n2. Batching efficiency at 8K (lsa)")
        print("| policy | B | tokens/s | ms/step | vs B=1 |")
        print("|---|---|---|---|---|")
        out["efficiency"] = efficiency(args, device, dtype)
    if "stall" not in args.skip:
        r = out["stall"] = stall(args, device, dtype)
        print(f"\n3. Worst stall: a {r['prompt_tokens']}-token prompt prefilled in pieces of {r['prefill_chunk']} while "
              f"4 sequences decode: worst gap between their tokens {r['worst_stall_seconds']:.2f} s "
              f"(median {r['median_step_seconds']:.2f} s) against {r['prefill_seconds']:.1f} s for the whole prefill")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
