"""`lsa`: the learned policy. The Neural Memory Indexer scores every chunk once per cycle.

Inputs are what decoding already produced, so there is no second forward pass:
  - query side: the attention input of the last decoded token at each target layer
    (`ctx.recorder.hidden(layer)[-1]`, kept by the runtime's hooks);
  - key side: the compressed keys of every complete chunk (at the indexer's fine run-time
    resolution when it has one), computed from the host mirror's post-RoPE keys the first time the
    chunk is complete and cached across cycles (`ChunkKeyStore`, fp16 or fp8), so a cycle only
    compresses the chunks that are new.
Chunks whose probability exceeds config.threshold (0.5) are wanted; `choose_pages` adds the
sink and the recency tail and caps the pages at the budget / KMAX, densest pages first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..indexer.checkpoint import CheckpointError, default_checkpoint, load_indexer
from ..indexer.keystore import ChunkKeyStore
from ..indexer.model import NeuralIndexer
from . import register_policy
from .base import SelectionContext, SelectionPolicy


def _model_config(obj):
    """The (text) config of a model, a Backbone, an attention module, or a config itself."""
    cfg = getattr(obj, "config", obj)
    if callable(getattr(cfg, "get_text_config", None)):
        cfg = cfg.get_text_config(decoder=True)
    return cfg


@register_policy
class LSAPolicy(SelectionPolicy):
    """Lookahead Sparse Attention with a trained indexer (the shipped one by default).

    checkpoint: an indexer folder from `flashmemory train`; None loads the indexer shipped
    for the backbone being decoded (an error names what to do if there is none).
    fp8_keys: keep the per-chunk key store as fp8 values + one fp32 scale per chunk.
    ensemble: override the checkpoint's cross-layer ensemble ("max" or "mean").
    fine_key_block: override the checkpoint's run-time key resolution (tokens per stored key, a
        divisor of the trained key_block; equal to it scores one resolution only). The store
        keeps keys at this resolution; the indexer scores them and their means at the trained
        resolution, best of both (docs/indexer.md, "Two key resolutions at run time").
    """

    name = "lsa"
    mode = "threshold"
    needs_queries = True

    def __init__(self, checkpoint: str | os.PathLike | NeuralIndexer | None = None, fp8_keys: bool = False,
                 ensemble: str | None = None, fine_key_block: int | None = None):
        if ensemble not in (None, "max", "mean"):
            raise ValueError(f"ensemble must be 'max' or 'mean', got {ensemble!r}")
        if fine_key_block is not None and (isinstance(fine_key_block, bool) or not isinstance(fine_key_block, int)
                                           or fine_key_block <= 0):
            raise ValueError(f"fine_key_block must be a positive integer, got {fine_key_block!r}")
        self.checkpoint = checkpoint
        self.fp8_keys = fp8_keys
        self.ensemble = ensemble
        self.fine_key_block = fine_key_block
        self.indexer: NeuralIndexer | None = checkpoint if isinstance(checkpoint, NeuralIndexer) else None
        self._bound: str | None = None
        self.store: ChunkKeyStore | None = None
        if self.indexer is not None:
            self._configure()
        elif checkpoint is not None and not Path(checkpoint).exists():
            raise CheckpointError(f"indexer checkpoint not found: {checkpoint}")

    # ------------------------------------------------------------------ loading
    def bind(self, model) -> "LSAPolicy":
        """Load (or check) the indexer for this backbone now rather than at the first cycle."""
        from ..models.loader import fingerprint

        cfg = _model_config(model)
        fp = fingerprint(cfg)
        if self._bound == fp:
            return self
        if isinstance(self.checkpoint, NeuralIndexer):
            if self.indexer.cfg.fingerprint not in (None, fp):
                raise CheckpointError(f"this indexer was trained for backbone {self.indexer.cfg.fingerprint}, "
                                      f"but the backbone is {fp}")
        else:
            path = self.checkpoint if self.checkpoint is not None else default_checkpoint(fp)
            self.indexer = load_indexer(path, fingerprint=fp)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        c = self.indexer.cfg
        if c.d_model != cfg.hidden_size or c.key_dim != cfg.num_key_value_heads * head_dim or \
                max(c.layers) >= cfg.num_hidden_layers:
            raise CheckpointError(f"the indexer's shapes (d_model {c.d_model}, key_dim {c.key_dim}, layers "
                                  f"{c.layers}) do not fit this backbone")
        self._configure()
        self._bound = fp
        return self

    def _configure(self) -> None:
        if self.ensemble is not None:
            self.indexer.cfg.ensemble = self.ensemble
        if self.fine_key_block is not None:
            if self.indexer.cfg.key_block % self.fine_key_block:
                raise CheckpointError(f"fine_key_block {self.fine_key_block} does not divide the indexer's key_block "
                                      f"({self.indexer.cfg.key_block})")
            self.indexer.cfg.fine_key_block = self.fine_key_block
        self.indexer.eval()
        self.store = None

    def reset(self) -> None:
        self.store = None  # a new sequence: its chunks differ

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.recorder is None:
            raise RuntimeError("the lsa policy reads the decoder's hidden states; run it through LSACache/LSAEngine")
        if self._bound is None:
            self.bind(ctx.recorder.modules[0])
        cfg = self.indexer.cfg
        if ctx.config.chunk_size != cfg.chunk_size:
            raise CheckpointError(f"the indexer was trained with chunk_size={cfg.chunk_size}, the runtime uses "
                                  f"chunk_size={ctx.config.chunk_size}; use the same chunk size")
        hidden = torch.stack([ctx.recorder.hidden(layer)[-1] for layer in cfg.layers])[None].float()
        device = hidden.device
        key_block = cfg.fine_key_block or cfg.key_block
        if self.store is None or self.store.device != device or self.store.key_block != key_block:
            self.store = ChunkKeyStore(cfg.layers, cfg.key_dim, cfg.chunk_size, fp8=self.fp8_keys, device=device,
                                       key_block=key_block)
            self.indexer.to(device)
        if self.store.n_chunks > ctx.length // cfg.chunk_size:
            self.store.reset()  # the history was rewound (same policy object, shorter sequence)
        self.store.extend_from_host(ctx.host_keys, ctx.length)
        keys = self.store.keys(ctx.n_chunks)
        position = torch.tensor([ctx.length - 1], device=device)  # the last decoded token
        return self.indexer(hidden, keys, position, key_block)[0].cpu()

    def index_bytes(self) -> int:
        """The key store (the lightning index): compressed keys of every complete chunk."""
        return 0 if self.store is None else self.store.nbytes

    def __repr__(self) -> str:
        return f"LSAPolicy(checkpoint={self.checkpoint!r})"
