"""Where does each policy rank the needle's chunk? A probe for one RULER-style sample.

    python benchmarks/needle_rank.py --task niah_multikey_1 --length 8192 --index 0
    python benchmarks/needle_rank.py --policies lsa,quest,/path/to/other-indexer
    python benchmarks/needle_rank.py --task niah_multikey_1 --index 1 --policies lsa --fine-key-blocks 8,2

One prefill, then for every policy: at each cycle, the chunk that holds the answer, its score
and how many chunks score higher, the policy's top 10 chunks, and the generated answer.
A policy name starting with "/" or "." is an indexer checkpoint folder for `lsa`.

    python benchmarks/needle_rank.py --per-layer runs/default-indexer/dump

--per-layer DUMP: also rank the needle's chunk at every candidate layer of a dump, with
untrained retrievers started from the backbone's own query projections (no distance prior):
which layers' queries point at the needle, to guide the choice of target layers.
"""

from __future__ import annotations

import argparse

import torch

from flashmemory import LSAConfig, LSAEngine, load_backbone
from flashmemory.eval.ruler import generate_samples
from flashmemory.eval.samples import PromptBuilder
from flashmemory.policies import make_policy
from flashmemory.traces.train import TrainConfig


def int_list(text: str) -> list[int]:
    """"8,2" -> [8, 2] (positive integers), for argparse."""
    try:
        values = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="niah_multikey_1")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--index", type=int, default=0, help="sample index (seed 0, as `flashmemory eval`)")
    p.add_argument("--samples", type=int, default=2, help="samples generated (the index picks one)")
    p.add_argument("--budget", type=float, default=0.12)
    p.add_argument("--policies", default="lsa,quest")
    p.add_argument("--per-layer", default=None, metavar="DUMP", help="rank per candidate layer of this dump")
    p.add_argument("--q-rank", type=int, default=TrainConfig.q_rank,
                   help="--per-layer: rank of the query projection kept")
    p.add_argument("--fine-key-blocks", type=int_list, default=None, metavar="K1,K2",
                   help="run every lsa policy once per run-time key resolution (tokens per stored key; "
                        "the trained key_block itself scores one resolution only)")
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
    if args.per_layer:
        print("  needle rank (chunks scoring higher, sink and tail excluded) per layer:",
              per_layer_ranks(engine, pre, args.per_layer, chunk, args.q_rank))
    runs = []
    for name in args.policies.split(","):
        lsa = name == "lsa" or name.startswith(("/", "."))
        checkpoint = name if name.startswith(("/", ".")) else None
        for kb in (args.fine_key_blocks if args.fine_key_blocks and lsa else [None]):
            policy = make_policy("lsa", checkpoint=checkpoint, fine_key_block=kb) if lsa else make_policy(name)
            runs.append((name if kb is None else f"{name}@fine_key_block={kb}", policy))
    for name, policy in runs:
        score = policy.score

        def probe(ctx, score=score, name=name):
            s = score(ctx)
            f = s.float()
            top = torch.argsort(f, descending=True)[:10].tolist()
            print(f"  {name} cycle {ctx.cycle}: answer chunk score {float(f[chunk]):.3f}, "
                  f"{int((f > f[chunk]).sum())} chunks higher (the chunk before it: {float(f[chunk - 1]):.3f}, "
                  f"{int((f > f[chunk - 1]).sum())} higher); top 10 {top}")
            return s

        policy.score = probe
        result = engine.decode(pre, policy, sample.max_new_tokens)
        print(f"  {name}: {result.text.strip()[:60]!r} (resident max {100 * result.report.resident_fraction_max:.1f}%)")


def per_layer_ranks(engine: LSAEngine, pre, dump: str, chunk: int, q_rank: int) -> dict[int, int]:
    from flashmemory.indexer.keystore import ChunkKeyStore
    from flashmemory.policies.lsa import LSAPolicy
    from flashmemory.traces.dataset import TraceSet
    from flashmemory.traces.train import build_indexer, init_from_backbone

    traces = TraceSet(dump)
    layers = traces.layers
    indexer = build_indexer(traces, TrainConfig(layers=layers, q_rank=q_rank))
    init_from_backbone(indexer, traces, list(range(min(10, len(traces.docs)))), 0.05)
    with torch.no_grad():
        for r in indexer.retrievers.values():
            r.distance_bias.zero_()
    cfg, ranks = engine.config, {}

    def probe(ctx):
        hidden = torch.stack([ctx.activations.hidden(layer)[-1] for layer in layers])[None].float()
        store = ChunkKeyStore(layers, indexer.cfg.key_dim, cfg.chunk_size, key_block=indexer.cfg.key_block)
        store.extend_from_host(ctx.host_keys, ctx.length)
        logits = indexer.layer_logits(hidden, store.keys(ctx.n_chunks), torch.tensor([ctx.length - 1]))[:, 0]
        lo, hi = cfg.sink_tokens // cfg.chunk_size, (ctx.length - cfg.tail_tokens) // cfg.chunk_size
        if not ranks:
            ranks.update({layer: int((logits[i, lo:hi] > logits[i, chunk]).sum()) for i, layer in enumerate(layers)})
        return torch.zeros(ctx.n_chunks)

    policy = LSAPolicy(checkpoint=indexer)
    policy.score = probe
    engine.decode(pre, policy, 3)  # the first cycle's selection is all we need
    return ranks


if __name__ == "__main__":
    main()
