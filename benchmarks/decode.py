"""Decode time per token and device KV bytes against context length: LSA vs a full static cache.

Both caches are filled with the same synthetic K/V (a CPU prefill of 128K tokens is
impractical), then decode the same tokens with random-weight backbones of two real shapes.
The baseline is transformers' preallocated `StaticCache`, its fastest full-cache option.
LSA runs the `quest` policy at a fixed page cap (KMAX), so it does real selection work
every tau steps; the timed window spans exactly one cycle boundary.

    python benchmarks/decode.py                       # 4K..128K, both shapes (~15 min on 2 cores)
    python benchmarks/decode.py --contexts 4096 16384 --shapes smollm2-135m --steps 16
    python benchmarks/decode.py --device cuda                 # model, static cache and LSA pool on the GPU

On CUDA the host mirror is pinned and the timings synchronize the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import SHAPES, build, synchronize, synthetic_history, synthetic_prefill  # noqa: E402

from flashmemory import LSAConfig, LSAEngine  # noqa: E402


def time_decode(model, cache, steps: int, warmup: int) -> float:
    """Mean seconds per decode step over `steps` steps, after `warmup` steps."""
    device = next(model.parameters()).device
    token = torch.tensor([[1]], device=device)
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                synchronize(device)
                start = time.perf_counter()
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def run_one(shape: str, context: int, steps: int, warmup: int, max_pages: int, device: torch.device) -> dict:
    total = context + warmup + steps + 64
    model = build(shape, total, device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    # LSA: a synthetic history in the host mirror, one sequence decoding with quest at KMAX pages
    lsa_cfg = LSAConfig(budget=None, max_pages=max_pages)
    engine = LSAEngine(model, lsa_cfg)
    history = synthetic_history(engine, context, warmup + steps + 64)

    # Baseline: the same K/V in a preallocated static cache
    static = StaticCache(config=cfg, max_cache_len=total)
    static.early_initialization(1, cfg.num_key_value_heads, head_dim, torch.float32, device)
    for layer_idx, layer in enumerate(static.layers):
        layer.keys[0, :, :context].copy_(history[0][layer_idx, :, :context])
        layer.values[0, :, :context].copy_(history[1][layer_idx, :, :context])
        layer.cumulative_length.fill_(context)
    static_bytes = sum(t.untyped_storage().nbytes() for layer in static.layers for t in (layer.keys, layer.values))
    t_static = time_decode(model, static, steps, warmup)
    del static
    gc.collect()

    seq = engine.submit_prefilled(synthetic_prefill(engine, history, context, warmup + steps + 2), "quest",
                                  max_new_tokens=warmup + steps + 2, stop_at_eos=False)  # still running at the end
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        engine.step()
    synchronize(device)
    t_lsa = (time.perf_counter() - start) / steps
    device_bytes = engine.memory().device_used_bytes
    fraction = seq.attended / seq.length
    cycles = sum(1 for c in seq.cycles if c.step >= warmup)
    engine.cancel(seq)
    engine.close()
    row = {
        "shape": shape, "context": context, "steps": steps,
        "static_ms": 1000 * t_static, "lsa_ms": 1000 * t_lsa, "speedup": t_static / t_lsa,
        "static_device_kv_bytes": static_bytes, "lsa_device_kv_bytes": device_bytes,
        "lsa_device_capacity_bytes": engine.pool.allocated_bytes, "full_kv_bytes": context * engine.shape.bytes_per_token,
        "resident_fraction": fraction, "cycles_in_window": cycles,
    }
    del engine, history, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=64, help="timed decode steps (64 = one cycle)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--max-pages", type=int, default=64, help="KMAX, the fixed LSA budget (pages of 32 tokens)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build sees no CUDA device")
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())

    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| shape | context | static ms/tok | LSA ms/tok | speedup | static device KV | LSA device KV | resident |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for context in args.contexts:
            r = run_one(shape, context, args.steps, args.warmup, args.max_pages, device)
            rows.append(r)
            print(f"| {shape} | {context} | {r['static_ms']:.1f} | {r['lsa_ms']:.1f} | {r['speedup']:.2f}x | "
                  f"{r['static_device_kv_bytes'] / 2**20:.1f} MiB | {r['lsa_device_kv_bytes'] / 2**20:.2f} MiB | "
                  f"{100 * r['resident_fraction']:.2f}% |", flush=True)
    for shape in args.shapes:
        mine = {r["context"]: r for r in rows if r["shape"] == shape}
        if 16384 in mine and 131072 in mine:
            growth = mine[131072]["lsa_ms"] / mine[16384]["lsa_ms"]
            print(f"{shape}: LSA ms/token 128K / 16K = {growth:.2f}x; speedup at 128K = {mine[131072]['speedup']:.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
