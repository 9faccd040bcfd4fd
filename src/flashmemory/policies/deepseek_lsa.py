"""`deepseek-lsa`: the release's first-level pick over DeepSeek-V4's CSA entries.

Once per cycle the release-form Neural Memory Indexer (`LightningIndexer`) scores every
compressed-sparse-attention entry of the history:
  - query side: the attention input of the last decoded token at each target CSA layer
    (`ctx.activations.hidden(layer)`, kept by `runtime.deepseek.DeepseekLSACache`'s hooks);
  - key side: the backbone's CSA indexer keys of every entry (the native indexer's compressed
    keys, Hadamard-rotated by `rotate_keys`), stored once per entry in the sequence's
    `Fp8KeyStore` (132 bytes per entry per target layer at head_dim 128).
Entries whose max-ensembled sigmoid score exceeds the threshold (0.5) are wanted;
`choose_pages` adds the recency tail and caps the pages at KMAX, densest pages first.

A unit of this policy ("chunk") is one CSA entry, a page is `page_entries` entries: the
runtime hands `choose_pages` an entry-space `LSAConfig` (see `DeepseekLSAConfig.entry_config`).

Without a checkpoint the indexer is initialised from the backbone's own native indexer weights
(`native_lightning_indexer`), as the release initialises its training: its logit is then the
model's own index score I(t, s) of the target layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from ..indexer.checkpoint import CheckpointError, checkpoint_format, load_lightning_indexer, load_release_checkpoint
from ..indexer.lightning import CSA_LAYER_TYPE, Fp8KeyStore, LightningConfig, LightningIndexer
from . import register_policy
from .base import SelectionContext, SelectionPolicy

#: The release's target layers (DeepSeek-V4-Flash CSA layers).
RELEASE_LAYERS = (10, 12, 20)


class DeepseekActivations(Protocol):
    """What the runtime keeps about the last processed token (see runtime.deepseek)."""

    csa_layers: list[int]     # the backbone's CSA layers, in the order of ctx.host_keys' first axis
    position: int             # the token's position

    def hidden(self, layer: int) -> torch.Tensor: ...


def csa_layers(config) -> list[int]:
    """Indices of the compressed-sparse-attention layers of a DeepseekV4Config."""
    return [i for i, t in enumerate(getattr(config, "layer_types", None) or []) if t == CSA_LAYER_TYPE]


def default_target_layers(config) -> tuple[int, ...]:
    """The release's layers 10, 12, 20, each clamped to the nearest CSA layer of this config (deduplicated).

    On DeepSeek-V4-Flash these are CSA layers and are kept as they are; a smaller model gets its
    CSA layers nearest to them (ties go to the deeper layer).
    """
    csa = csa_layers(config)
    if not csa:
        raise CheckpointError("this DeepSeek-V4 config has no compressed-sparse-attention layer to index")
    chosen: list[int] = []
    for layer in RELEASE_LAYERS:
        nearest = min(csa, key=lambda c: (abs(c - layer), -c))
        if nearest not in chosen:
            chosen.append(nearest)
    return tuple(sorted(chosen))


@torch.no_grad()
def native_lightning_indexer(model: torch.nn.Module, layers: tuple[int, ...] | None = None,
                             **overrides: object) -> LightningIndexer:
    """A `LightningIndexer` whose weights are the backbone's native indexer at `layers`.

    Mapping (Hugging Face `DeepseekV4ForCausalLM` -> release names), per layer L:
    `self_attn.q_a_proj` -> `wq_a`, `self_attn.q_a_norm.weight` -> `q_norm_weight`,
    `self_attn.compressor.indexer.q_b_proj` -> `wq_b`,
    `self_attn.compressor.indexer.scorer.weights_proj` -> `weights_proj`. The native score
    scales ReLU(q.k) by index_head_dim^-1/2 and the head weights by index_n_heads^-1/2, which is
    the release's w scaling, so the logit equals the native index score (the Hadamard rotation
    of both sides leaves q.k unchanged). `overrides` set LightningConfig fields.
    """
    config = model.config
    layers = tuple(layers) if layers is not None else default_target_layers(config)
    cfg = LightningConfig.from_hf_config(config, layers=layers, **overrides)
    indexer = LightningIndexer(cfg)
    decoder = model.model.layers
    for layer in cfg.layers:
        attn = decoder[layer].self_attn
        native = attn.compressor.indexer
        part = indexer.retrievers[f"l{layer}"]
        part.wq_a.weight.copy_(attn.q_a_proj.weight.float())
        part.q_norm_weight.copy_(attn.q_a_norm.weight.float())
        part.wq_b.weight.copy_(native.q_b_proj.weight.float())
        part.weights_proj.weight.copy_(native.scorer.weights_proj.weight.float())
    return indexer.eval()


@dataclass
class _Bound:
    fingerprint: str
    device: torch.device


@register_policy
class DeepseekLSAPolicy(SelectionPolicy):
    """The release's LSA over DeepSeek-V4 CSA entries (threshold 0.5, max ensemble, fp8 keys).

    checkpoint: a `LightningIndexer`, a release `.pt` file, or one of our safetensors folders;
    None initialises the indexer from the backbone's native indexer weights at `layers`.
    layers: target CSA layers (default: 10, 12, 20 clamped to this backbone's CSA layers; a
    checkpoint's own layers when one is given).
    ensemble: override the indexer's cross-layer ensemble ("max" or "mean").
    """

    name = "deepseek-lsa"
    mode = "threshold"
    keep_sink = True

    def __init__(self, checkpoint: str | os.PathLike | LightningIndexer | None = None,
                 layers: tuple[int, ...] | None = None, ensemble: str | None = None):
        if ensemble not in (None, "max", "mean"):
            raise ValueError(f"ensemble must be 'max' or 'mean', got {ensemble!r}")
        if checkpoint is not None and not isinstance(checkpoint, LightningIndexer) and not Path(checkpoint).exists():
            raise CheckpointError(f"indexer checkpoint not found: {checkpoint}")
        self.checkpoint = checkpoint
        self.layers = tuple(layers) if layers is not None else None
        self.ensemble = ensemble
        self.indexer: LightningIndexer | None = checkpoint if isinstance(checkpoint, LightningIndexer) else None
        self._bound: _Bound | None = None

    def bind(self, model) -> "DeepseekLSAPolicy":
        """Load (or build, or check) the indexer for this DeepSeek-V4 backbone."""
        from ..models.loader import fingerprint

        config = model.config
        if getattr(config, "model_type", None) != "deepseek_v4":
            raise CheckpointError(f"the deepseek-lsa policy needs a DeepSeek-V4 backbone, got model_type="
                                  f"{getattr(config, 'model_type', None)!r}")
        fp = fingerprint(config)
        device = next(model.parameters()).device
        if self._bound is not None and self._bound.fingerprint == fp:
            return self
        if self.checkpoint is None:
            self.indexer = native_lightning_indexer(model, self.layers)
        elif not isinstance(self.checkpoint, LightningIndexer):
            if checkpoint_format(self.checkpoint) == "release":
                layers = self.layers or RELEASE_LAYERS
                self.indexer = load_release_checkpoint(
                    self.checkpoint, LightningConfig.from_hf_config(config, layers=layers))
            else:
                self.indexer = load_lightning_indexer(self.checkpoint, fingerprint=fp)
        if self.ensemble is not None:
            self.indexer.cfg = replace(self.indexer.cfg, ensemble=self.ensemble)
        cfg = self.indexer.cfg
        if cfg.fingerprint not in (None, fp):
            raise CheckpointError(f"this indexer is bound to backbone {cfg.fingerprint}, the backbone is {fp}")
        if cfg.d_model != config.hidden_size or cfg.head_dim != config.index_head_dim:
            raise CheckpointError(f"the indexer's sizes (d_model {cfg.d_model}, head_dim {cfg.head_dim}) do not fit "
                                  f"this backbone (hidden {config.hidden_size}, index_head_dim {config.index_head_dim})")
        bad = [L for L in cfg.layers if L not in csa_layers(config)]
        if bad:
            raise CheckpointError(f"target layers {bad} are not CSA layers of this backbone ({csa_layers(config)})")
        if self.layers is not None and tuple(self.layers) != tuple(cfg.layers):
            raise CheckpointError(f"the indexer scores layers {list(cfg.layers)}, layers={list(self.layers)} was asked")
        self.indexer.to(device).eval()
        self._bound = _Bound(fp, device)
        return self

    @property
    def target_layers(self) -> list[int]:
        """The CSA layers whose hidden states and keys the indexer reads (after `bind`)."""
        if self.indexer is None:
            raise RuntimeError("bind the deepseek-lsa policy to a backbone first")
        return self.indexer.layers

    def new_index(self, ctx: SelectionContext) -> Fp8KeyStore:
        """The sequence's lightning index: fp8 keys of its entries at the target layers."""
        self._check(ctx)
        return Fp8KeyStore(len(self.target_layers), self.indexer.cfg.head_dim, device=self._bound.device)

    def _check(self, ctx: SelectionContext) -> None:
        if self._bound is None or ctx.activations is None:
            raise RuntimeError("the deepseek-lsa policy reads the decoder's hidden states and CSA keys; run it "
                               "through runtime.deepseek.DeepseekLSACache")
        if ctx.config.chunk_size != 1:
            raise RuntimeError("the deepseek-lsa policy scores single CSA entries (an entry-space config with "
                               "chunk_size 1, see DeepseekLSAConfig.entry_config)")

    @torch.no_grad()
    def score(self, ctx: SelectionContext) -> torch.Tensor:
        """Ensembled sigmoid scores [n_chunks] of the entries of the complete pages."""
        self._check(ctx)
        acts: DeepseekActivations = ctx.activations
        store: Fp8KeyStore = ctx.index
        rows = [acts.csa_layers.index(layer) for layer in self.target_layers]
        if store.n_entries < ctx.length:
            new = ctx.host_keys[rows, 0, store.n_entries:ctx.length].to(self._bound.device)
            store.append(self.indexer.rotate_keys(new))
        keys = store.packed(ctx.n_chunks)
        hidden = torch.stack([acts.hidden(layer) for layer in self.target_layers])[None]
        position = torch.tensor([acts.position], device=hidden.device)
        return self.indexer(hidden.to(self._bound.device), keys, position)[0].cpu()

    def __repr__(self) -> str:
        return f"DeepseekLSAPolicy(checkpoint={self.checkpoint!r}, layers={self.layers!r})"
