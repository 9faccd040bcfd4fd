"""8K experiment (docs/indexer.md, "The 8K finding"): train each candidate layer set with the
shipped recipe (20 epochs) on the default dump + long dump B, score on long dump A.

    flashmemory dump --out runs/long8k/dump  --synthetic 12 --seed 777 --min-tokens 6144 --max-tokens 7168 \
        --label-layers 9-29 --candidate-layers 14-27 --label-stride 2 --min-layers 3 --no-quest
    flashmemory dump --out runs/long8k/dumpB --synthetic 24 --seed 778 ...same flags...
    python benchmarks/experiments/long8k_pick_layers.py runs/default-indexer/dump,runs/long8k/dumpB "[22,24]" "[18,22,24]"
"""
import json, sys, time
from dataclasses import asdict
from flashmemory.traces.dataset import TraceSet
from flashmemory.traces.recipe import DEFAULT_TRAIN
from flashmemory.traces.train import TrainConfig, train_indexer, evaluate

EPOCHS = 20
sets = [json.loads(s) for s in sys.argv[2:]]
train_dumps = sys.argv[1].split(",")
out = {}
for layers in sets:
    t = time.perf_counter()
    cfg = TrainConfig(**{**asdict(DEFAULT_TRAIN), "layers": layers, "epochs": EPOCHS})
    res = train_indexer(train_dumps, cfg, progress=False)
    A = TraceSet("runs/long8k/dump", layers=layers)
    docs = list(range(len(A.docs)))
    qa = [d for d in docs if A.docs[d].meta.get("kind") == "qa"]
    m = 3
    all_ = evaluate(res.indexer, A, docs, m, budget=0.10)
    q = evaluate(res.indexer, A, qa, m, budget=0.10)
    row = {"all": all_.recall_at_budget, "qa": q.recall_at_budget, "all_r16": all_.recall_at_k.get(16),
           "qa_r16": q.recall_at_k.get(16), "val": res.val.recall_at_budget, "s": round(time.perf_counter() - t)}
    out[str(layers)] = row
    print(layers, json.dumps(row), flush=True)
