"""8K experiment: train the shipped recipe with overrides on several dumps and save the checkpoint.

    python benchmarks/experiments/long8k_train_overrides.py '{"q_rank": 576, "extend_distance_prior": true}' runs/keys/ix-r576e runs/default-indexer/dump
"""
import json
import sys
from dataclasses import asdict

from flashmemory.indexer.checkpoint import save_indexer
from flashmemory.traces.recipe import DEFAULT_TRAIN
from flashmemory.traces.train import TrainConfig, train_indexer

overrides, out, dumps = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
res = train_indexer(dumps, TrainConfig(**{**asdict(DEFAULT_TRAIN), **overrides}), progress=False)
save_indexer(res.indexer, out)
print(json.dumps(res.summary()["val"]), res.summary()["seconds"])
