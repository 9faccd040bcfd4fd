"""The Neural Memory Indexer: model, per-chunk key store ("lightning index") and checkpoints."""

from .checkpoint import (CheckpointError, default_checkpoint, load_deepseek_retrievers, load_indexer,
                         read_meta, save_indexer)
from .keystore import ChunkKeyStore, compress_keys
from .model import IndexerConfig, IndexerConfigError, LayerRetriever, NeuralIndexer

__all__ = ["CheckpointError", "ChunkKeyStore", "IndexerConfig", "IndexerConfigError", "LayerRetriever",
           "NeuralIndexer", "compress_keys", "default_checkpoint", "load_deepseek_retrievers", "load_indexer",
           "read_meta", "save_indexer"]
