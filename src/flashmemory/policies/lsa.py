"""`lsa`: the learned policy. The Neural Memory Indexer scores every chunk once per cycle.

Inputs are what decoding already produced, so there is no second forward pass:
  - query side: the attention input of the last decoded token at each target layer
    (`ctx.activations.hidden(layer)[-1]`, kept by the runtime's hooks);
  - key side: the compressed keys of every complete chunk (at the indexer's fine run-time
    resolution when it has one), computed from the host mirror's post-RoPE keys the first time the
    chunk is complete and kept across cycles in the sequence's `ChunkKeyStore` (fp16 or fp8), so a
    cycle only compresses the chunks that are new.
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
        if self.fine_key_block is not None and self.indexer.cfg.key_block % self.fine_key_block:
            raise CheckpointError(f"fine_key_block {self.fine_key_block} does not divide the indexer's key_block "
                                  f"({self.indexer.cfg.key_block})")
        self.indexer.eval()

    def run_settings(self) -> dict:
        """How this policy scores at run time beyond the checkpoint's weights (part of a result's identity)."""
        return {"key_block": self.key_block, "ensemble": self.ensemble or self.indexer.cfg.ensemble,
                "fp8_keys": self.fp8_keys}

    @property
    def key_block(self) -> int:
        """Tokens per stored key at run time (this policy's override, else the checkpoint's)."""
        cfg = self.indexer.cfg
        return self.fine_key_block or cfg.fine_key_block or cfg.key_block

    # ------------------------------------------------------------------ scoring
    def new_index(self, ctx: SelectionContext) -> ChunkKeyStore:
        """The sequence's key store: compressed keys of its complete chunks (the lightning index)."""
        self._check(ctx)
        cfg = self.indexer.cfg
        device = ctx.activations.hidden(cfg.layers[0]).device
        self.indexer.to(device)
        return ChunkKeyStore(cfg.layers, cfg.key_dim, cfg.chunk_size, fp8=self.fp8_keys, device=device,
                             key_block=self.key_block)

    def _check(self, ctx: SelectionContext) -> None:
        if ctx.activations is None:
            raise RuntimeError("the lsa policy reads the decoder's hidden states; run it through LSACache/LSAEngine")
        if self._bound is None:
            self.bind(ctx.activations.modules[0])
        missing = [layer for layer in self.indexer.cfg.layers if layer not in ctx.key_layers]
        if missing:
            raise CheckpointError(f"the indexer reads layers {missing}, which keep no full history here "
                                  "(sliding-window layers); train it on global layers")
        if ctx.config.chunk_size != self.indexer.cfg.chunk_size:
            raise CheckpointError(f"the indexer was trained with chunk_size={self.indexer.cfg.chunk_size}, the "
                                  f"runtime uses chunk_size={ctx.config.chunk_size}; use the same chunk size")

    @torch.no_grad()
    def score(self, ctx: SelectionContext) -> torch.Tensor:
        self._check(ctx)
        cfg = self.indexer.cfg
        hidden = torch.stack([ctx.activations.hidden(layer)[-1] for layer in cfg.layers])[None].float()
        store: ChunkKeyStore = ctx.index
        store.extend_from_host(ctx.host_keys, ctx.length, [ctx.key_layers.index(layer) for layer in cfg.layers])
        keys = store.keys(ctx.n_chunks)
        position = torch.tensor([ctx.length - 1], device=hidden.device)  # the last decoded token
        return self.indexer(hidden, keys, position, self.key_block, ensemble=self.ensemble)[0].cpu()

    def __repr__(self) -> str:
        return f"LSAPolicy(checkpoint={self.checkpoint!r})"
