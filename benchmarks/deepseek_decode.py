"""DeepSeek-V4 with LSA over CSA entries: device KV and decode time against context length.

A random-weight DeepseekV4ForCausalLM, scaled down (the tiny shape of tests/test_deepseek_runtime.py:
hidden 64, head_dim 32, index_head_dim 16, sliding window 16; CSA and HCA layers alternate
with sliding layers), prefills a random prompt in pieces through `DeepseekLSACache`, then
decodes greedily. Measured per context:
  - device KV: every tensor the cache holds on the device (sliding windows, HCA entries, the
    compressors' buffers and the resident CSA entries), against the full cache (the same plus
    the non-resident CSA entries, i.e. what the stock cache holds);
  - decode ms per step, and the LSA overhead: the time of the cycle starts (indexer scoring and
    page choice; copies and rebuilding) as a share of the decode time.

    python benchmarks/deepseek_decode.py                                   # 4K, 16K, 64K
    python benchmarks/deepseek_decode.py --contexts 4096 --steps 72 --json out.json

The decode window spans two cycle starts (steps 0 and tau); the first follows the prefill.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from flashmemory.runtime.deepseek import DeepseekLSACache, DeepseekLSAConfig


def tiny_config(layers: int, topk: int) -> DeepseekV4Config:
    """The scaled-down DeepSeek-V4 shape (sliding, CSA, HCA layers repeated)."""
    if layers % 3:
        raise SystemExit(f"--layers must be a multiple of 3 (sliding, CSA, HCA), got {layers}")
    return DeepseekV4Config(
        vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=topk,
        sliding_window=16, num_nextn_predict_layers=0,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"] * (layers // 3))


def device_kv_bytes(cache: DeepseekLSACache) -> int:
    """Bytes of every distinct tensor storage the cache's layers hold (K and V share storage in V4)."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()

    for layer in cache.layers:
        add(layer.keys)
        add(layer.values)
        for name in ("compressed_kv", "buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate"):
            for t in getattr(layer, name, {}).values():
                add(t)
    return sum(seen.values())


@torch.no_grad()
def run_one(model, context: int, steps: int, config: DeepseekLSAConfig, chunk: int, seed: int) -> dict:
    """Prefill `context` random tokens in pieces, decode `steps` tokens; measure memory and time."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    with DeepseekLSACache(model, config) as cache:
        started = time.perf_counter()
        logits = None
        for start in range(0, context, chunk):
            logits = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True).logits
        prefill = time.perf_counter() - started
        token = logits[:, -1:].argmax(-1)
        full_before = device_kv_bytes(cache)
        started = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - started
        device = device_kv_bytes(cache)
        last = cache.steps[-1]
        full = device + (last.entries - last.resident) * cache.entry_bytes
        select = sum(c.select_seconds for c in cache.cycles)
        move = sum(c.move_seconds for c in cache.cycles)
        return {
            "context": context, "steps": steps, "prefill_s": round(prefill, 2),
            "decode_ms_per_step": round(1000 * decode / steps, 2),
            "csa_entries_per_layer": last.entries, "csa_resident_per_layer": last.resident,
            "resident_pages": last.pages, "cycles": len(cache.cycles),
            "device_kv_bytes": device, "full_kv_bytes": full, "full_over_device": round(full / device, 2),
            "device_kv_bytes_after_prefill": full_before,
            "csa_device_bytes": last.device_bytes, "host_mirror_bytes": cache.host_bytes,
            "lightning_index_bytes": cache.index.nbytes if cache.index is not None else 0,
            "select_share": round(select / decode, 4), "cycle_share": round((select + move) / decode, 4),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--steps", type=int, default=72, help="decode steps (more than tau to cross a cycle start)")
    ap.add_argument("--kmax", type=int, default=32, help="KMAX: device pages of CSA entries")
    ap.add_argument("--page", type=int, default=64, help="CSA entries per page")
    ap.add_argument("--tail", type=int, default=1024, help="recency tail in CSA entries")
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--topk", type=int, default=64, help="the native indexer's top-k (index_topk)")
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny ops)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.contexts) <= 0 or args.steps <= 0 or args.prefill_chunk <= 0:
        raise SystemExit("--contexts, --steps and --prefill-chunk must be positive")
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(tiny_config(args.layers, args.topk)).eval()
    config = DeepseekLSAConfig(page_entries=args.page, tau=args.tau, tail_entries=args.tail, max_pages=args.kmax)
    rows = []
    for context in args.contexts:
        row = run_one(model, context, args.steps, config, args.prefill_chunk, seed=context)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
