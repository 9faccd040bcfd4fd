"""The runtime on one compute device (CUDA or CPU): exactness, residency, measured memory, speed.

    python benchmarks/device_check.py --device cuda                       # embedded SmolLM2-135M
    python benchmarks/device_check.py --device cuda --random-weights DIR  # SmolLM2-shaped random weights

DIR holds a model's config.json and tokenizer files (no weights): the check builds a random-weight
model of that shape (seed 0), for machines that cannot hold the real weights. Its fingerprint is the
real model's, so the shipped indexer runs (its choices mean nothing on random weights).

1. Stock path: transformers' greedy `generate` on the device against `LSAEngine` with every chunk
   resident (full, quest, lsa at budget 1.0) and against `LSACache` inside `model.generate`:
   the tokens must be identical.
2. Every policy at a sparse budget on one long prompt (one prefill shared): resident fraction,
   the KV bytes the report counts on the device pool's tensors, the device allocator's peak during
   the decode beyond the weights (pools, index, activations, the shared prefill's state) next to full's, whether the host mirror is
   pinned and the pool lives on the device, transfers, and ms/token.
Exits non-zero when a check fails; --json-out writes every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

from flashmemory import LSACache, LSAConfig, LSAEngine, load_backbone
from flashmemory.eval.haystack import essay_text

POLICIES = ["full", "lsa", "quest", "recency", "random", "streaming", "oracle"]


def random_weight_folder(config_dir: str) -> str:
    """Save a random-weight model of config_dir's shape, with its tokenizer, into a temp folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = tempfile.mkdtemp(prefix="random-weights-")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def common_prefix(got: list[int], ref: list[int]) -> int:
    """How many leading tokens agree."""
    n = 0
    while n < min(len(got), len(ref)) and got[n] == ref[n]:
        n += 1
    return n


def stock_path(backbone, text: str, prompt_tokens: int, new_tokens: int) -> dict:
    """Greedy tokens of transformers vs ours with every chunk resident."""
    model, device = backbone.model, next(backbone.model.parameters()).device
    ids = backbone.tokenizer(text)["input_ids"][:prompt_tokens]
    x = torch.tensor([ids], device=device)
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)[0, len(ids):].tolist()
    engine = LSAEngine(backbone, LSAConfig(budget=1.0))
    pre = engine.prefill(ids, max_new_tokens=new_tokens)
    rows = {}
    for policy in ("full", "quest", "lsa"):
        got = engine.decode(pre, policy, new_tokens, stop_at_eos=False).token_ids
        rows[f"engine/{policy}"] = common_prefix(got, ref)
    engine.close()
    with LSACache(model, LSAConfig(budget=1.0), policy="streaming", max_length=len(ids) + new_tokens) as cache:
        got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, past_key_values=cache)[0, len(ids):].tolist()
    rows["LSACache in model.generate"] = common_prefix(got, ref)
    return {"tokens": len(ref), "equal_prefix": rows, "ok": all(v == len(ref) for v in rows.values())}


def policies(backbone, text: str, prompt_tokens: int, new_tokens: int, budget: float) -> list[dict]:
    """Every policy on one prefill; the device allocator's peak during each decode."""
    device = next(backbone.model.parameters()).device
    engine = LSAEngine(backbone, LSAConfig(budget=budget))
    ids = backbone.tokenizer(text)["input_ids"][:prompt_tokens]
    pre = engine.prefill(ids, max_new_tokens=new_tokens)
    engine.close()
    host = pre.host
    weights = sum(t.numel() * t.element_size() for t in [*backbone.model.parameters(), *backbone.model.buffers()])
    rows = []
    for name in POLICIES:
        synchronize(device)
        gc.collect()  # the previous decode's engine, and its device pool, are gone
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with LSAEngine(backbone, LSAConfig(budget=budget)) as engine:  # a fresh device pool for each policy
            result = engine.decode(pre, name, new_tokens, stop_at_eos=False)
        synchronize(device)
        r = result.report
        rows.append({
            "policy": name, "tokens": len(result.token_ids),
            "resident_max": r.resident_fraction_max, "resident_mean": r.resident_fraction_mean,
            "device_kv_bytes_peak": r.device_kv_bytes_peak, "full_kv_bytes": r.full_kv_bytes,
            "index_bytes": r.index_bytes, "recalls": r.transfers.get("recalls"),
            "ms_per_token": r.decode_ms_per_token, "wall_s": time.perf_counter() - start,
            # everything the allocator held beyond the weights: pools, index, activations, the prefill's state
            "allocator_peak_over_weights": (torch.cuda.max_memory_allocated(device) - weights)
            if device.type == "cuda" else None,
        })
    rows.append({"policy": "_mirror", "host_pinned": bool(host.k.is_pinned()), "host_device": str(host.k.device),
                 "prompt_tokens": len(ids)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random-weights", metavar="DIR", default=None, help="config + tokenizer folder (no weights)")
    p.add_argument("--stock-tokens", type=int, default=1200, help="prompt tokens of the stock-path check")
    p.add_argument("--prompt-tokens", type=int, default=8000, help="prompt tokens of the policy run")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--budget", type=float, default=0.12)
    p.add_argument("--text", default=None, help="haystack text file (default: the Paul Graham essays)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: this torch build sees no CUDA device")
    if args.random_weights and not os.path.isfile(os.path.join(args.random_weights, "config.json")):
        p.error(f"--random-weights {args.random_weights}: no config.json there (a model folder's config and tokenizer)")
    if args.text and not os.path.isfile(args.text):
        p.error(f"--text {args.text}: no such file")

    folder = random_weight_folder(args.random_weights) if args.random_weights else None
    backbone = load_backbone(folder, device=args.device)
    device = next(backbone.model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, model {'random weights' if folder else backbone.path}")
    text = open(args.text, encoding="utf-8").read() if args.text else essay_text()

    stock = stock_path(backbone, text, args.stock_tokens, args.new_tokens)
    print(f"stock path ({stock['tokens']} tokens, budget 1.0): "
          + ", ".join(f"{k} {v}/{stock['tokens']} equal" for k, v in stock["equal_prefix"].items()))

    rows = policies(backbone, text, args.prompt_tokens, args.new_tokens, args.budget)
    mirror = rows.pop()
    print(f"\n{mirror['prompt_tokens']}-token prompt, budget {args.budget}; host mirror on {mirror['host_device']}, "
          f"pinned: {mirror['host_pinned']}")
    full_peak = next(r["allocator_peak_over_weights"] for r in rows if r["policy"] == "full")
    print("| policy | resident max | device KV peak (counted) | full KV | index | allocator peak beyond weights "
          "| vs full | recalls | ms/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = r["allocator_peak_over_weights"]
        print(f"| {r['policy']} | {100 * r['resident_max']:.1f}% | {r['device_kv_bytes_peak'] / 2**20:.1f} MiB | "
              f"{r['full_kv_bytes'] / 2**20:.1f} MiB | {r['index_bytes'] / 2**20:.1f} MiB | "
              f"{'-' if peak is None else f'{peak / 2**20:.1f} MiB'} | "
              f"{'-' if peak is None or not full_peak else f'{peak / full_peak:.2f}'} | {r['recalls']} | "
              f"{r['ms_per_token']:.1f} |")
    ok = stock["ok"] and all(r["resident_max"] <= args.budget + 1e-6 for r in rows if r["policy"] not in
                             ("full", "oracle"))
    if device.type == "cuda":
        ok = ok and mirror["host_pinned"]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "random_weights": bool(folder), "stock": stock,
                       "policies": rows, "mirror": mirror}, f, indent=1)
    print("\nall checks passed" if ok else "\nA CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
