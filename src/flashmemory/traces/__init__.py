"""Backbone-free training data: trace dumps with golden labels, the dataset, training, layer search.

Stage 1 (`dump.run_dump`, `flashmemory dump`) runs the backbone; everything else reads only
the dump: `dataset.TraceSet`, `train.train_indexer` (`flashmemory train`, DDP under
torchrun) and `search.search_layers` (`flashmemory layers`).
"""

from .corpus import TraceDocument, file_corpus, synthetic_corpus
from .dataset import TraceError, TraceSet
from .dump import DumpConfig, DumpError, DumpSummary, run_dump
from .labels import Population, layer_votes, window_max
from .metrics import ScoreMetrics, score_metrics
from .train import TrainConfig, TrainError, TrainResult, evaluate, train_indexer

__all__ = ["TraceDocument", "file_corpus", "synthetic_corpus", "TraceError", "TraceSet", "DumpConfig", "DumpError",
           "DumpSummary", "run_dump", "Population", "layer_votes", "window_max", "ScoreMetrics", "score_metrics",
           "TrainConfig", "TrainError", "TrainResult", "evaluate", "train_indexer"]
