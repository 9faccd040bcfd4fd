"""8K experiment: train one layer set with the shipped recipe (60 epochs) on the default dump + long
dump B and save the checkpoint.  python benchmarks/experiments/long8k_train.py "[22,23,24]" runs/long8k/ix-222324
"""
import json, sys
from dataclasses import asdict
from flashmemory.indexer.checkpoint import save_indexer
from flashmemory.traces.recipe import DEFAULT_TRAIN
from flashmemory.traces.train import TrainConfig, train_indexer
layers = json.loads(sys.argv[1]); out = sys.argv[2]
res = train_indexer(["runs/default-indexer/dump", "runs/long8k/dumpB"], TrainConfig(**{**asdict(DEFAULT_TRAIN), "layers": layers}), progress=False)
save_indexer(res.indexer, out)
print(json.dumps(res.summary()["val"]), res.summary()["seconds"])
