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
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

from flashmemory import LSACache, LSAConfig

SHAPES = {
    # SmolLM2-135M (Llama): 30 layers, 3 KV heads of 64
    "smollm2-135m": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                                         vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True)),
    # Qwen2.5-0.5B (Qwen2): 24 layers, 2 KV heads of 64 (vocab cut to keep the random model small)
    "qwen2.5-0.5b": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                                                         rope_theta=1e6, tie_word_embeddings=True)),
}


def build(shape: str, max_len: int, device: torch.device) -> torch.nn.Module:
    model_cls, config_cls, kw = SHAPES[shape]
    config = config_cls(max_position_embeddings=max_len, attn_implementation="sdpa", **kw)
    torch.manual_seed(0)
    return model_cls(config).eval().to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    gen = torch.Generator().manual_seed(0)

    # LSA: fill the host mirror with synthetic post-RoPE K/V, then decode
    lsa_cfg = LSAConfig(budget=None, max_pages=max_pages)
    lsa = LSACache(model, lsa_cfg, policy="quest", max_length=total)
    lsa.host.k[:, :, :context].normal_(generator=gen)
    lsa.host.v[:, :, :context].normal_(generator=gen)
    lsa.host.length = context
    lsa.rewind(context)

    # Baseline: the same K/V in a preallocated static cache
    static = StaticCache(config=cfg, max_cache_len=total)
    static.early_initialization(1, cfg.num_key_value_heads, head_dim, torch.float32, device)
    for layer_idx, layer in enumerate(static.layers):
        layer.keys[0, :, :context].copy_(lsa.host.k[layer_idx, :, :context])
        layer.values[0, :, :context].copy_(lsa.host.v[layer_idx, :, :context])
        layer.cumulative_length.fill_(context)
    static_bytes = sum(t.untyped_storage().nbytes() for layer in static.layers for t in (layer.keys, layer.values))

    t_static = time_decode(model, static, steps, warmup)
    del static
    gc.collect()
    t_lsa = time_decode(model, lsa, steps, warmup)
    lsa.close()
    device_bytes = lsa.device_kv_bytes
    fraction = lsa._active / lsa.length
    row = {
        "shape": shape, "context": context, "steps": steps,
        "static_ms": 1000 * t_static, "lsa_ms": 1000 * t_lsa, "speedup": t_static / t_lsa,
        "static_device_kv_bytes": static_bytes,
        "lsa_device_kv_bytes": device_bytes,
        "lsa_device_reserved_bytes": lsa.stats.memory.device_reserved_bytes,
        "full_kv_bytes": lsa.full_kv_bytes,
        "resident_fraction": fraction,
        "bytes_vs_fraction_error": abs(device_bytes - fraction * lsa.full_kv_bytes) / device_bytes,
        "cycles_in_window": sum(1 for c in lsa.stats.cycles if c.step >= warmup),
    }
    del lsa, model
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
    print("| shape | context | static ms/tok | LSA ms/tok | speedup | static device KV | LSA device KV | "
          "resident | |bytes - frac*full|/bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for context in args.contexts:
            r = run_one(shape, context, args.steps, args.warmup, args.max_pages, device)
            rows.append(r)
            print(f"| {shape} | {context} | {r['static_ms']:.1f} | {r['lsa_ms']:.1f} | {r['speedup']:.2f}x | "
                  f"{r['static_device_kv_bytes'] / 2**20:.1f} MiB | {r['lsa_device_kv_bytes'] / 2**20:.2f} MiB | "
                  f"{100 * r['resident_fraction']:.2f}% | {100 * r['bytes_vs_fraction_error']:.3f}% |", flush=True)
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
