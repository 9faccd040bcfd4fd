"""8K experiment: recall at a 10% budget of indexer checkpoints on long dump A (12 unseen 6-7K-token
documents).  python benchmarks/experiments/long8k_recall.py src/flashmemory/indexer/default runs/long8k/ix-222324
"""
import sys
from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.traces.dataset import TraceSet
from flashmemory.traces.train import evaluate
for path in sys.argv[1:]:
    ix = load_indexer(path)
    A = TraceSet("runs/long8k/dump", layers=ix.layers)
    docs = list(range(len(A.docs))); qa = [d for d in docs if A.docs[d].meta.get("kind") == "qa"]
    a = evaluate(ix, A, docs, 3, budget=0.10); q = evaluate(ix, A, qa, 3, budget=0.10)
    print(path, ix.layers, "all %.3f qa %.3f all_r16 %.3f qa_r16 %.3f resident-recall %.3f" % (a.recall_at_budget, q.recall_at_budget, a.recall_at_k[16], q.recall_at_k[16], a.recall_resident))
