"""The shipped indexer against its targets: held-out recall, training time, decode overhead.

    python benchmarks/indexer.py                        # all three parts (~30-40 min on 2 cores)
    python benchmarks/indexer.py --parts recall         # held-out recall only
    python benchmarks/indexer.py --parts train --train-dump runs/default-indexer/dump
    python benchmarks/indexer.py --model gemma3-270m --parts recall   # Gemma's indexer, 8-12K documents

Parts:
  recall    dump held-out documents (built-in generator, another seed than the training corpus,
            6-7K tokens for SmolLM2 and 8-12K for Gemma-3-270m unless --doc-tokens says otherwise,
            with the quest baseline; cached under --heldout) and score the shipped indexer: recall of
            golden chunks for the selection LSA makes (threshold 0.5, capped at a 10% resident
            budget after sink + tail), the resident fraction that produces, recall@K and F1,
            and quest's recall at the same budget. Recall is given twice: over the chunks the
            indexer chooses among (sink and tail excluded) and over all golden chunks of the
            history (the share of them the resident set holds).
  train     retrain the model's indexer from its recipe's dump with the shipped recipe and
            time it (target: at most 10 minutes on the 2-core CPU); the dump time recorded
            in the shipped checkpoint is reported too.
  signals   on the held-out dump of `recall` (run it first): recall at the budget of other rankings,
            to show where more recall could come from. Over every anchor: the indexer's scores
            fused with quest's (sum of the two ranks) and the labels themselves (the ceiling). Over
            the anchors with another anchor of the same document 64+ tokens earlier (a previous
            cycle): the indexer plus the chunks that previous cycle used (kept by at least one
            global layer's top-p set) among those it had resident (sink, tail and the indexer's
            top picks at the budget), and plus every chunk it used (resident or not).
  overhead  one 8K prefill, then `lsa` decoding through the runtime: the time spent in the
            policy's scoring (every tau steps) as a share of decode time (target: <= 5%).
Results go to benchmarks/results/indexer.json, or indexer_<model>.json for another model (and are printed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
#: held-out documents per model: (min tokens, max tokens); the generator sizes by characters, so leave
#: room under the context the dump allows (8K for SmolLM2; Gemma's dump is given max + 1K)
DOC_TOKENS = {"smollm2-135m": (6144, 7168), "gemma3-270m": (8192, 12288)}


def part_recall(args) -> dict:
    from flashmemory.indexer.checkpoint import load_indexer, shipped_dir
    from flashmemory.models.loader import load_backbone
    from flashmemory.traces.corpus import synthetic_corpus
    from flashmemory.traces.dataset import TraceSet
    from flashmemory.traces.dump import DumpConfig, run_dump
    from flashmemory.traces.recipe import RECIPES
    from flashmemory.traces.train import evaluate

    recipe = RECIPES[args.model]
    indexer = load_indexer(args.indexer or shipped_dir(args.model))
    meta_layers = indexer.layers
    lo, hi = args.doc_tokens or DOC_TOKENS[args.model]
    spec = {"generator": "synthetic", "n_docs": args.heldout_docs, "seed": 4242, "min_tokens": lo, "max_tokens": hi}
    # keys at the resolution the indexer scores with at run time (its key store), not its training dump's
    cfg = DumpConfig(**{**recipe.dump.__dict__, "quest_baseline": True, "candidate_layers": meta_layers,
                        "key_block": indexer.cfg.fine_key_block or indexer.cfg.key_block,
                        "max_tokens": max(recipe.dump.max_tokens, hi + 1024)})
    start = time.perf_counter()
    backbone = load_backbone(args.model)
    corpus = synthetic_corpus(spec["n_docs"], spec["seed"], spec["min_tokens"], spec["max_tokens"])
    summary = run_dump(backbone, corpus, args.heldout, cfg, corpus_spec=spec, progress=True)
    dump_s = time.perf_counter() - start
    traces = TraceSet(args.heldout, layers=meta_layers)
    docs = list(range(len(traces.docs)))
    m = indexer.cfg.extra.get("min_layers", cfg.min_layers)
    lsa = evaluate(indexer, traces, docs, m, budget=args.budget)
    quest = evaluate(None, traces, docs, m, budget=args.budget, scorer="quest")
    tokens_mean = sum(traces.docs[d].meta["tokens"] for d in docs) / len(docs)
    return {"model": args.model, "heldout_docs": len(docs), "doc_tokens": [lo, hi], "tokens_mean": tokens_mean,
            "anchors": lsa.anchors, "dump_seconds_this_run": round(dump_s, 1),
            "dump_new_documents": summary.documents, "budget": args.budget, "min_layers": m,
            "positive_rate": lsa.positive_rate,
            "lsa": {"recall_capped": lsa.recall_capped, "resident_fraction": lsa.resident_fraction,
                    "recall_resident_at_budget": lsa.recall_resident,
                    "recall_at_budget": lsa.recall_at_budget, "recall_at_threshold": lsa.recall, "f1": lsa.f1,
                    "precision": lsa.precision, "selected_fraction": lsa.selected_fraction,
                    "recall_at_k": {str(k): v for k, v in lsa.recall_at_k.items()}},
            "quest": {"recall_at_budget": quest.recall_at_budget, "recall_resident_at_budget": quest.recall_resident,
                      "recall_at_k": {str(k): v for k, v in quest.recall_at_k.items()}},
            "targets": {"recall>=0.90 (selectable chunks)": (lsa.recall_capped or 0) >= 0.90,
                        "recall>=0.90 (all golden chunks)": lsa.recall_resident >= 0.90,
                        "resident<=0.10": (lsa.resident_fraction or 1) <= 0.10}}


def part_signals(args) -> dict:
    from flashmemory.indexer.checkpoint import load_indexer, shipped_dir
    from flashmemory.traces.dataset import TraceSet
    from flashmemory.traces.metrics import score_metrics

    indexer = load_indexer(args.indexer or shipped_dir(args.model))
    traces = TraceSet(args.heldout, layers=indexer.layers)
    c, block = traces.population.chunk_size, traces.params.get("key_block")
    m = indexer.cfg.extra.get("min_layers", traces.params.get("min_layers", 1))
    rankings = {k: [] for k in ("lsa", "lsa+quest ranks", "labels (ceiling)")}
    cycles = {k: [] for k in ("lsa", "lsa + previous cycle's used resident chunks", "lsa + every chunk it used")}
    labels, pops, cyc_labels, cyc_pops = [], [], [], []

    def rank(x: torch.Tensor) -> torch.Tensor:
        return x.argsort().argsort().float() / len(x)

    with torch.no_grad():
        for doc in traces.docs:
            probs = indexer(doc.hidden, doc.keys, doc.positions, block).float()
            spans = [(a, (pos + 1) // c) for a, pos in enumerate(doc.positions.tolist())]
            for a, n in spans:
                p, y, pop = probs[a, :n], doc.votes[a, :n] >= m, doc.population[a, :n]
                rankings["lsa"].append(p)
                rankings["lsa+quest ranks"].append(rank(p) + rank(doc.quest[a, :n].float()))
                rankings["labels (ceiling)"].append(y.float() + 1e-3 * p)
                labels.append(y)
                pops.append(pop)
                earlier = [s for s in spans if doc.positions[a] - doc.positions[s[0]] >= 64]
                if not earlier:
                    continue
                pa, pn = earlier[-1]
                prev_pop = doc.population[pa, :pn]
                resident = ~prev_pop
                picks = torch.where(prev_pop)[0]
                k = max(0, int(args.budget * pn) - int(resident.sum()))
                resident[picks[probs[pa, picks].argsort(descending=True)[:k]]] = True
                used = torch.zeros(n, dtype=torch.bool)
                used[:pn] = doc.votes[pa, :pn] >= 1
                used_resident = used.clone()
                used_resident[:pn] &= resident
                cycles["lsa"].append(p)
                cycles["lsa + previous cycle's used resident chunks"].append(p + used_resident.float())
                cycles["lsa + every chunk it used"].append(p + used.float())
                cyc_labels.append(y)
                cyc_pops.append(pop)

    def recall(scores, ys, ps) -> dict:
        r = score_metrics(scores, ys, ps, budget=args.budget, threshold=None)
        return {"recall_resident_at_budget": round(r.recall_resident, 3), "recall_at_budget": round(r.recall_at_budget, 3)}

    return {"anchors": len(labels), "all_anchors": {k: recall(v, labels, pops) for k, v in rankings.items()},
            "anchors_after_a_cycle": len(cyc_labels),
            "after_a_cycle": {k: recall(v, cyc_labels, cyc_pops) for k, v in cycles.items()}}


def part_train(args) -> dict:
    from flashmemory.indexer.checkpoint import read_meta, shipped_dir
    from flashmemory.traces.recipe import RECIPES
    from flashmemory.traces.train import train_indexer

    recipe = RECIPES[args.model]
    shipped = read_meta(shipped_dir(args.model))["config"]["extra"]
    out = {"shipped_dump_seconds": shipped.get("dump_seconds"),
           "shipped_train_seconds": (shipped.get("metrics") or {}).get("seconds")}
    dump = Path(args.train_dump or Path(recipe.work) / "dump")
    if dump.is_dir():
        start = time.perf_counter()
        result = train_indexer(dump, recipe.train)
        out.update({"retrain_seconds": round(time.perf_counter() - start, 1), "epochs_run": result.epochs_run,
                    "val_recall_at_budget": result.val.recall_at_budget if result.val else None,
                    "target_train<=600s": time.perf_counter() - start <= 600})
    return out


def part_overhead(args) -> dict:
    from flashmemory import LSAConfig, LSAEngine, load_backbone
    from flashmemory.policies import make_policy

    backbone = load_backbone(args.model)
    engine = LSAEngine(backbone, LSAConfig(budget=0.15))
    words = (Path(__file__).parent.parent / "README.md").read_text().split() * 200
    ids = engine.encode(" ".join(words))[: args.context]
    pre = engine.prefill(ids, max_new_tokens=args.steps)
    policy = make_policy("lsa")
    score, spent = policy.score, []

    def timed(ctx):  # wrap the bound method: the cost of one cycle's selection by the indexer
        t = time.perf_counter()
        out = score(ctx)
        spent.append(time.perf_counter() - t)
        return out

    policy.score = timed
    res = engine.decode(pre, policy, max_new_tokens=args.steps, stop_at_eos=False)
    decode_s = res.report.decode_ms_per_token * res.report.new_tokens / 1000
    base = engine.decode(pre, "recency", max_new_tokens=args.steps, stop_at_eos=False)
    return {"context": len(ids), "steps": res.report.new_tokens, "cycles": len(spent),
            "score_seconds_per_cycle": sum(spent) / max(1, len(spent)),
            "decode_ms_per_token_lsa": res.report.decode_ms_per_token,
            "decode_ms_per_token_recency": base.report.decode_ms_per_token,
            "overhead_share": sum(spent) / decode_s, "target<=0.05": sum(spent) / decode_s <= 0.05,
            "prefill_seconds": pre.seconds if hasattr(pre, "seconds") else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="recall,train,overhead")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(DOC_TOKENS),
                   help="embedded backbone whose shipped indexer is measured (recall, train)")
    p.add_argument("--indexer", default=None, help="checkpoint folder (default: the model's shipped one)")
    p.add_argument("--heldout", default=None,
                   help="held-out dump folder, created or resumed (default runs/indexer-heldout[-MODEL])")
    p.add_argument("--heldout-docs", type=int, default=12)
    p.add_argument("--doc-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="held-out document length (default: 6144 7168 for SmolLM2, 8192 12288 for Gemma)")
    p.add_argument("--budget", type=float, default=0.10)
    p.add_argument("--train-dump", default=None, help="dump to retrain from (default: the recipe's work folder)")
    p.add_argument("--context", type=int, default=8192 - 192)
    p.add_argument("--steps", type=int, default=128)
    args = p.parse_args()
    if args.doc_tokens and not 64 <= args.doc_tokens[0] <= args.doc_tokens[1]:
        p.error(f"--doc-tokens needs 64 <= MIN <= MAX, got {args.doc_tokens[0]} {args.doc_tokens[1]}")
    default = args.model == "smollm2-135m"
    args.heldout = args.heldout or ("runs/indexer-heldout" if default else f"runs/indexer-heldout-{args.model}")
    out = RESULTS / ("indexer.json" if default else f"indexer_{args.model}.json")
    torch.manual_seed(0)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for part in args.parts.split(","):
        fn = {"recall": part_recall, "signals": part_signals, "train": part_train, "overhead": part_overhead}[part.strip()]
        results[part.strip()] = fn(args)
        print(json.dumps({part: results[part.strip()]}, indent=2), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
