"""Which chunk/page size? Needle retrieval and cost at a fixed budget, on the real default model.

For each needle prompt (one prefill, shared), the oracle policy decodes at a 15% budget with
chunk = page in {16, 32, 64, 128} tokens. We report how often the needle is answered, the
share of budget left for selected pages after sink + tail + the cycle's open region, the
recalls per cycle and decode ms/token. `full` is run once per prompt as the reference.

    python benchmarks/chunk_size.py --samples 3
"""

from __future__ import annotations

import argparse
import random
import statistics

from flashmemory import BudgetError, LSAConfig, LSAEngine, load_backbone

FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
          "The river runs past the old mill.", "A quiet street leads to the square.", "Bread is sold at the market."]


def needle_prompt(rng: random.Random, n_sentences: int) -> tuple[str, str]:
    code = str(rng.randint(1000, 9999))
    body = [rng.choice(FILLER) for _ in range(n_sentences)]
    body.insert(rng.randint(n_sentences // 10, n_sentences // 2), f"The secret passcode for the blue door is {code}.")
    question = "\n\nQuestion: What is the secret passcode for the blue door? Answer with the number only."
    return " ".join(body) + question, code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--sentences", type=int, default=520, help="haystack sentences (~3.3K tokens)")
    p.add_argument("--budget", type=float, default=0.15)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    args = p.parse_args()

    engine = LSAEngine(load_backbone())
    rng = random.Random(0)
    results = {size: [] for size in args.sizes}
    full_ok = 0
    for _ in range(args.samples):
        prompt, code = needle_prompt(rng, args.sentences)
        pre = engine.prefill(engine.encode(prompt, chat=True), max_new_tokens=16)
        full_ok += code in engine.decode(pre, "full", 16).text
        for size in args.sizes:
            cfg = LSAConfig(chunk_size=size, page_size=size, sink_tokens=size, tail_tokens=max(128, size),
                            budget=args.budget)
            try:
                r = engine.decode(pre, "oracle", 16, config=cfg)
            except BudgetError:
                results[size].append(None)
                continue
            c = r.report
            budget_pages = cfg.budget_tokens(c.prompt_tokens) // size
            free = max(0, c.resident_pages_per_cycle[0] - cfg.sink_pages - cfg.tail_pages)
            results[size].append({"ok": code in r.text, "free_share": free * size / cfg.budget_tokens(c.prompt_tokens),
                                  "recalls": c.transfers["recalls"] / max(1, c.cycles),
                                  "ms": statistics.median(c.decode_ms[1:] or c.decode_ms), "pages": budget_pages})
        print(f"prompt of {len(pre.prompt_ids)} tokens done", flush=True)

    print(f"\nfull answers {full_ok}/{args.samples}; oracle at budget {args.budget}:")
    print("| chunk = page | needle answered | budget share left for selection | recalls / cycle | decode ms/token (median) |")
    print("|---|---|---|---|---|")
    for size, rows in results.items():
        ok_rows = [r for r in rows if r is not None]
        if not ok_rows:
            print(f"| {size} | budget too small for sink + tail + cycle | - | - | - |")
            continue
        print(f"| {size} | {sum(r['ok'] for r in ok_rows)}/{len(rows)} | "
              f"{100 * statistics.mean(r['free_share'] for r in ok_rows):.0f}% | "
              f"{statistics.mean(r['recalls'] for r in ok_rows):.0f} | {statistics.mean(r['ms'] for r in ok_rows):.0f} |")


if __name__ == "__main__":
    main()
