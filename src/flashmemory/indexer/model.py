"""The Neural Memory Indexer: one small dual encoder per target layer, ensembled across layers.

Shape (DeepSeek's lightning indexer, adapted to an ordinary attention backbone):

    query side   h (the attention input of the target layer, dim d_model)
                 -> wq_a (low rank) -> RMSNorm -> wq_b -> H heads x key_dim
                 -> RoPE at the query's position (every rotary block, see below)
                 w = weights_proj(h) * key_dim^-1/2 * H^-1/2            (one weight per head)
    key side     compressed keys k (frozen, computed from the backbone's own keys): the mean of
                 the post-RoPE keys of each block of `key_block` (8) tokens per KV head, KV
                 heads concatenated, so key_dim = kv_heads * head_dim; a chunk of 32 tokens
                 has 4 such keys
    logit        max over the chunk's keys of sum_h w_h * ReLU(q_h . k), + bias; then the max of
                 that and the previous chunk's logit + `spill` (0: a chunk is kept whenever its
                 predecessor is, since a fact that starts there often ends here);
                 + distance_bias[log2 distance in chunks]
    probability  sigmoid(logit)

Why every dimension is rotated: the backbone's keys are rotated in all their dimensions,
so rotating the whole query by the same rotary blocks at the query's position makes q.k
depend on the distance to the chunk rather than on absolute positions (DeepSeek rotates only
part of each head because only part of its keys is rotated). Two small additions to the
DeepSeek shape: a per-layer `bias` calibrates the sigmoid for the 0.5 threshold, and a
learned bias per log2-distance bucket is a recency prior (averaging keys over a chunk washes
out most of RoPE's fine position signal, and attention beyond the tail decays with distance).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn


class IndexerConfigError(ValueError):
    """An indexer configuration that cannot work."""


@dataclass
class IndexerConfig:
    """Sizes of the indexer and what it is bound to (validated at construction). The sizes have no
    defaults here: whoever builds one sets them (training from TrainConfig and the dump's
    DumpConfig, loading from the checkpoint)."""

    d_model: int                       # backbone hidden size (the query side's input)
    key_dim: int                       # compressed key size = kv_heads * head_dim
    rope_dim: int                      # size of one rotary block (the backbone's head_dim)
    layers: list[int]                  # backbone target layers, one retriever each
    n_heads: int
    q_rank: int                        # low rank of the query projection (wq_a)
    chunk_size: int                    # tokens per chunk (the scoring unit)
    key_block: int                     # tokens per compressed key (a chunk has chunk_size / key_block keys)
    inv_freq: list[float] | None = None  # the backbone's rotary frequencies; None: no query RoPE
    ensemble: Literal["max", "mean"] = "max"
    key_scale: float = 1.0             # keys are multiplied by this (set from data at training start)
    distance_buckets: int = 12         # learned logit bias per log2-distance bucket (0: none)
    score: Literal["relu", "softmax"] = "relu"  # head aggregation, see LayerRetriever.forward
    spill: float | None = 0.0          # a chunk also takes its predecessor's logit + this offset (None: off)
    fine_key_block: int | None = None  # run time: also score finer keys (a divisor of key_block), best of both
    fingerprint: str | None = None     # backbone this indexer was trained for
    extra: dict = field(default_factory=dict)  # provenance (label parameters, metrics, ...)

    def __post_init__(self) -> None:
        if not isinstance(self.distance_buckets, int) or self.distance_buckets < 0:
            raise IndexerConfigError(f"distance_buckets must be a non-negative integer, got {self.distance_buckets!r}")
        for name in ("d_model", "key_dim", "rope_dim", "n_heads", "q_rank", "chunk_size", "key_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise IndexerConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
            raise IndexerConfigError(f"layers must be a non-empty list of layer indices, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise IndexerConfigError(f"layers must not repeat, got {self.layers!r}")
        if self.chunk_size % self.key_block:
            raise IndexerConfigError(f"chunk_size ({self.chunk_size}) must be a multiple of key_block ({self.key_block})")
        if self.fine_key_block is not None and (isinstance(self.fine_key_block, bool) or not isinstance(
                self.fine_key_block, int) or self.fine_key_block <= 0 or self.key_block % self.fine_key_block):
            raise IndexerConfigError(f"fine_key_block must be a positive divisor of key_block ({self.key_block}), "
                                     f"got {self.fine_key_block!r}")
        if self.key_dim % self.rope_dim:
            raise IndexerConfigError(f"key_dim ({self.key_dim}) must be a multiple of rope_dim ({self.rope_dim})")
        if self.inv_freq is not None and len(self.inv_freq) * 2 != self.rope_dim:
            raise IndexerConfigError(f"inv_freq has {len(self.inv_freq)} entries; rope_dim {self.rope_dim} needs "
                                     f"{self.rope_dim // 2}")
        if self.score not in ("relu", "softmax"):
            raise IndexerConfigError(f"score must be 'relu' or 'softmax', got {self.score!r}")
        if self.ensemble not in ("max", "mean"):
            raise IndexerConfigError(f"ensemble must be 'max' or 'mean', got {self.ensemble!r}")
        if not (self.key_scale > 0 and math.isfinite(self.key_scale)):
            raise IndexerConfigError(f"key_scale must be a positive number, got {self.key_scale!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise IndexerConfigError(f"unknown indexer config fields: {', '.join(unknown)}")
        return cls(**data)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, block: int) -> torch.Tensor:
    """Apply the backbone's rotary embedding (rotate-half convention) to every `block` dims of x.

    x: [B, ..., dim] with dim a multiple of block; positions: [B].
    """
    angles = positions.float()[:, None] * inv_freq.float()[None, :]                 # [B, block/2], fp32 always
    cos = torch.cat([angles.cos(), angles.cos()], -1)                                # [B, block]
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    shape = x.shape
    xb = x.reshape(shape[0], -1, block)                                              # [B, n_blocks, block]
    half = block // 2
    rot = torch.cat([-xb[..., half:], xb[..., :half]], -1)
    out = xb * cos[:, None].to(x.dtype) + rot * sin[:, None].to(x.dtype)
    return out.reshape(shape)


def coarsen_keys(keys: torch.Tensor, factor: int) -> torch.Tensor:
    """Block keys [..., n, key_dim] -> [..., n / factor, key_dim]: the mean of each run of `factor`
    consecutive blocks (a mean of equal-size block means is the mean over the larger block)."""
    *lead, n, d = keys.shape
    return keys.reshape(*lead, n // factor, factor, d).mean(-2)


class LayerRetriever(nn.Module):
    """The dual encoder of one target layer (parameter names follow the DeepSeek checkpoint)."""

    def __init__(self, cfg: IndexerConfig):
        super().__init__()
        self.cfg = cfg
        self.wq_a = nn.Linear(cfg.d_model, cfg.q_rank, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(cfg.q_rank))
        self.wq_b = nn.Linear(cfg.q_rank, cfg.n_heads * cfg.key_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        if cfg.score == "softmax":
            # logit = scale * log(mass): the temperature of the per-head softmax and the log-mass scale
            self.log_temperature = nn.Parameter(torch.tensor(-0.5 * math.log(cfg.rope_dim)))
            self.mass_scale = nn.Parameter(torch.ones(()))
        if cfg.distance_buckets:
            self.distance_bias = nn.Parameter(torch.zeros(cfg.distance_buckets))
        # built once; non-persistent, so checkpoints hold only the config's list
        inv = torch.tensor(cfg.inv_freq if cfg.inv_freq is not None else [], dtype=torch.float32)
        self.register_buffer("inv_freq", inv, persistent=False)

    def queries(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, d_model], positions [B] -> q [B, H, key_dim], head weights [B, H]."""
        cfg = self.cfg
        a = self.wq_a(hidden)
        a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * self.q_norm_weight
        q = self.wq_b(a).view(hidden.shape[0], cfg.n_heads, cfg.key_dim)
        if cfg.inv_freq is not None:
            q = rotate(q, positions, self.inv_freq, cfg.rope_dim)
        w = self.weights_proj(hidden) * (cfg.key_dim ** -0.5 * cfg.n_heads ** -0.5)
        return q, w

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                key_block: int | None = None) -> torch.Tensor:
        """Chunk logits [B, n] for hidden [B, d_model] against block keys [B, n * per, key_dim] or
        shared [n * per, key_dim] (per = chunk_size / key_block keys per chunk, in order;
        key_block defaults to the trained one).

        Each block key is scored, and a chunk takes the best of its blocks: a fact a few
        tokens long keeps its own key instead of being averaged with a whole chunk.
        """
        q, w = self.queries(hidden, positions)
        keys = keys.to(q.dtype) * self.cfg.key_scale
        if keys.dim() == 2:
            dots = torch.einsum("bhd,nd->bhn", q, keys)
        else:
            dots = torch.einsum("bhd,bnd->bhn", q, keys)
        per = self.cfg.chunk_size // (key_block or self.cfg.key_block)
        if self.cfg.score == "relu":
            logits = torch.einsum("bh,bhn->bn", w, torch.relu(dots))
            logits = logits.reshape(logits.shape[0], -1, per).amax(-1) + self.bias
        else:
            logits = self._softmax_score(dots.reshape(*dots.shape[:2], -1, per).amax(-1), w, positions)
        if self.cfg.spill is not None:  # a fact that starts near a chunk's end continues in the next chunk
            prev = torch.nn.functional.pad(logits[:, :-1], (1, 0), value=-30.0) + self.cfg.spill
            logits = torch.maximum(logits, prev)
        if self.cfg.distance_buckets:
            logits = logits + self.distance_bias[self.buckets(positions, logits.shape[-1])]
        return logits

    def _softmax_score(self, dots: torch.Tensor, w: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """score="softmax": each head's attention distribution over the history's chunks, mixed by
        softmax(w) over heads, as a log mass. Mirrors how golden labels are made (head-mean
        attention mass per chunk), so an indexer started from the backbone's own query
        projection ranks chunks like real attention before any training."""
        n = dots.shape[-1]
        visible = torch.arange(n, device=dots.device)[None] < \
            torch.div(positions + 1, self.cfg.chunk_size, rounding_mode="floor")[:, None]
        z = (dots * self.log_temperature.exp()).masked_fill(~visible[:, None], -1e4)  # finite: no NaN gradients
        logp = torch.log_softmax(z, -1)                                    # [B, H, n] per-head chunk distribution
        mix = torch.log_softmax(w, -1)[:, :, None]                         # [B, H, 1] head mixture
        log_mass = torch.logsumexp(logp + mix, 1)                          # [B, n]
        log_mass = log_mass + torch.log(visible.sum(-1, keepdim=True).clamp_min(1).float())  # 0 = uniform
        return (self.mass_scale * log_mass).masked_fill(~visible, -30.0) + self.bias

    def buckets(self, positions: torch.Tensor, n: int) -> torch.Tensor:
        """[B, n] log2 bucket of each chunk's distance (in chunks) from the query's chunk."""
        here = torch.div(positions, self.cfg.chunk_size, rounding_mode="floor")[:, None]
        dist = (here - torch.arange(n, device=positions.device)[None]).clamp_min(1)
        return torch.log2(dist.float()).floor().long().clamp(0, self.cfg.distance_buckets - 1)


class NeuralIndexer(nn.Module):
    """Retrievers for every target layer plus the cross-layer ensemble."""

    def __init__(self, cfg: IndexerConfig):
        super().__init__()
        self.cfg = cfg
        # Module names "l{layer}" give checkpoint keys like retrievers.l10.wq_a.weight.
        self.retrievers = nn.ModuleDict({f"l{layer}": LayerRetriever(cfg) for layer in cfg.layers})

    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers)

    def layer_logits(self, hidden: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                     key_block: int | None = None) -> torch.Tensor:
        """Per-layer logits [L, B, n].

        hidden: [B, L, d_model] (the attention inputs at cfg.layers, in that order);
        keys: [B, L, n * per, key_dim] or shared [L, n * per, key_dim] at `key_block` tokens per key
        (default cfg.key_block); positions: [B] query positions.
        """
        out = []
        for i, layer in enumerate(self.cfg.layers):
            k = keys[i] if keys.dim() == 3 else keys[:, i]
            out.append(self.retrievers[f"l{layer}"](hidden[:, i], k, positions, key_block))
        return torch.stack(out)

    def ensemble(self, layer_logits: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """Probabilities [B, n] from per-layer logits [L, B, n]: max (union) or mean of probabilities
        (`how`, default the config's ensemble)."""
        probs = torch.sigmoid(layer_logits)
        return probs.amax(0) if (how or self.cfg.ensemble) == "max" else probs.mean(0)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                key_block: int | None = None, ensemble: str | None = None) -> torch.Tensor:
        """Ensembled probabilities [B, n] that each chunk is needed in the next tau steps.

        Keys finer than the trained resolution (`key_block` a divisor of cfg.key_block) are scored
        twice: as given, and averaged back to the trained resolution; a chunk takes the better
        probability. Fine keys catch a match on one or two tokens (a number after "is:") that an
        8-token mean blurs; the trained resolution keeps a phrase-level match that the max over
        many fine blocks can bury in noise.
        """
        kb = key_block or self.cfg.key_block
        if self.cfg.key_block % kb:
            raise ValueError(f"keys of {kb} tokens cannot be averaged to the trained {self.cfg.key_block}")
        probs = self.ensemble(self.layer_logits(hidden, keys, positions, kb), ensemble)
        if kb != self.cfg.key_block:
            coarse = coarsen_keys(keys, self.cfg.key_block // kb)
            probs = torch.maximum(probs, self.ensemble(self.layer_logits(hidden, coarse, positions), ensemble))
        return probs

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
