"""Where does each policy rank the needle's chunk? A probe for one RULER-style sample.

    python benchmarks/needle_rank.py --task niah_multikey_1 --length 8192 --index 0
    python benchmarks/needle_rank.py --policies lsa,quest,/path/to/other-indexer

One prefill, then for every policy: at each cycle, the chunk that holds the answer, its score
and how many chunks score higher, the policy's top 10 chunks, and the generated answer.
A policy name starting with "/" or "." is an indexer checkpoint folder for `lsa`.
"""

from __future__ import annotations

import argparse

import torch

from flashmemory import LSAConfig, LSAEngine, load_backbone
from flashmemory.eval.ruler import generate_samples
from flashmemory.eval.samples import PromptBuilder
from flashmemory.policies import make_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="niah_multikey_1")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--index", type=int, default=0, help="sample index (seed 0, as `flashmemory eval`)")
    p.add_argument("--samples", type=int, default=2, help="samples generated (the index picks one)")
    p.add_argument("--budget", type=float, default=0.12)
    p.add_argument("--policies", default="lsa,quest")
    args = p.parse_args()

    backbone = load_backbone(None)
    tok = backbone.tokenizer
    builder = PromptBuilder(tok, chat=True, max_context=backbone.max_context)
    sample = generate_samples(args.task, builder, args.samples, args.length, 0)[args.index]
    config = LSAConfig(budget=args.budget, page_size=32, sink_tokens=32, tail_tokens=128)
    engine = LSAEngine(backbone, config)
    ids = engine.encode(sample.input, chat=True) + builder.prefix_ids(sample.answer_prefix)
    answer = sample.answers[0]
    pattern = tok(" " + answer, add_special_tokens=False)["input_ids"]
    where = [i for i in range(len(ids)) if ids[i: i + len(pattern)] == pattern]
    if not where:
        raise SystemExit(f"the answer {answer!r} is not found as tokens in the prompt")
    chunk = where[0] // config.chunk_size
    print(f"{sample.id}: answer {answer!r} at token {where[0]}, chunk {chunk} of {len(ids) // config.chunk_size}")
    pre = engine.prefill(ids, max_new_tokens=sample.max_new_tokens + config.tau)
    for name in args.policies.split(","):
        policy = make_policy("lsa", checkpoint=name) if name.startswith(("/", ".")) else make_policy(name)
        score = policy.score

        def probe(ctx, score=score, name=name):
            s = score(ctx)
            f = s.float()
            top = torch.argsort(f, descending=True)[:10].tolist()
            print(f"  {name} cycle {ctx.cycle}: answer chunk score {float(f[chunk]):.3f}, "
                  f"{int((f > f[chunk]).sum())} chunks higher; top 10 {top}")
            return s

        policy.score = probe
        result = engine.decode(pre, policy, sample.max_new_tokens)
        print(f"  {name}: {result.text.strip()[:60]!r} (resident max {100 * result.report.resident_fraction_max:.1f}%)")


if __name__ == "__main__":
    main()
