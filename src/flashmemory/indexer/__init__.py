"""The Neural Memory Indexer: model, per-chunk key store ("lightning index") and checkpoints.

Two indexer forms: `NeuralIndexer` for ordinary attention backbones, and `LightningIndexer`,
the published FlashMemory DeepSeek-V4 form (with its fp8 key store and checkpoint formats).
"""

from .checkpoint import (CheckpointError, checkpoint_format, convert_checkpoint, default_checkpoint, load_indexer,
                         load_lightning_indexer, load_release_checkpoint, read_meta, save_indexer,
                         save_lightning_indexer, save_release_checkpoint)
from .keystore import ChunkKeyStore, compress_keys
from .lightning import (Fp8KeyStore, LightningConfig, LightningIndexer, LightningRetriever, hadamard_matrix,
                        pack_fp8_keys, unpack_fp8_keys, yarn_inv_freq)
from .model import IndexerConfig, IndexerConfigError, LayerRetriever, NeuralIndexer

__all__ = ["CheckpointError", "ChunkKeyStore", "Fp8KeyStore", "IndexerConfig", "IndexerConfigError", "LayerRetriever",
           "LightningConfig", "LightningIndexer", "LightningRetriever", "NeuralIndexer", "checkpoint_format",
           "compress_keys", "convert_checkpoint", "default_checkpoint", "hadamard_matrix", "load_indexer",
           "load_lightning_indexer", "load_release_checkpoint", "pack_fp8_keys", "read_meta", "save_indexer",
           "save_lightning_indexer", "save_release_checkpoint", "unpack_fp8_keys", "yarn_inv_freq"]
