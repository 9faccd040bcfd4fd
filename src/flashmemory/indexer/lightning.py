"""The Neural Memory Indexer in the exact form of the FlashMemory DeepSeek-V4 release.

Per target layer (a CSA layer of DeepSeek-V4), with h the layer's hidden state at the query:

    q = wq_b( RMSNorm_{q_norm_weight}( wq_a h ) )          -> [n_heads, head_dim]
    q = RoPE(q[..., -rope_dim:], query position)             YaRN-scaled, interleaved pairs
    q = q @ H                                                normalised Sylvester Hadamard matrix
    w = weights_proj(h) * head_dim^-1/2 * n_heads^-1/2       -> [n_heads]
    logit(entry) = sum_h w_h * ReLU(q_h . k_entry)
    score(entry) = sigmoid(logit)

and the layers' scores are ensembled by max (union, the release's default) or mean; an
entry is selected when the ensembled score exceeds `threshold` (0.5).

The keys k are the backbone's compressed (CSA indexer) keys, already rotated by the same
Hadamard matrix: the release's SGLang path rotates both sides before fp8 quantisation, and
since H is orthogonal, q.k is unchanged by rotating both. Keys from a backbone that does
not rotate them (Hugging Face's `DeepseekV4Indexer` does not) go through
`LightningIndexer.rotate_keys` before they are stored.

Everything is computed in fp32 like the release's training forward; the release's serving
path additionally rounds q to bf16 before RoPE and quantises q to fp8, which this module
does not do.

Keys are stored as the release stores them: uint8 [N, head_dim + 4] = head_dim float8_e4m3fn
bytes and one fp32 scale (132 bytes at head_dim 128); see `pack_fp8_keys` and
`Fp8KeyStore`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .keystore import quantize_fp8
from .model import IndexerConfigError

#: The tensors of one layer in the release's checkpoint, `retrievers.l{L}.<part>`.
RELEASE_PARTS = ("wq_a.weight", "wq_b.weight", "q_norm_weight", "weights_proj.weight")

#: Bytes of the fp32 scale appended to each packed fp8 key.
SCALE_BYTES = 4

CSA_LAYER_TYPE = "compressed_sparse_attention"


@dataclass(frozen=True)
class LightningConfig:
    """Sizes, RoPE parameters and decision rule of the release-form indexer (validated at construction).

    The defaults are the published release's: 128 heads x 128 dims, q rank 2048, hidden size
    4096, RoPE on the last 64 dims of each head with YaRN (base 160000, factor 16, original
    context 65536, beta_fast 32, beta_slow 1), layers 10, 12, 20, max ensemble, threshold 0.5,
    Hadamard on. `rope_factor` 1 means plain RoPE (no YaRN). `fingerprint` names the backbone
    the indexer is bound to (`flashmemory.models.loader.fingerprint`), None when unknown.
    """

    d_model: int = 4096
    q_rank: int = 2048
    n_heads: int = 128
    head_dim: int = 128
    rope_dim: int = 64
    rope_theta: float = 160000.0
    rope_factor: float = 16.0
    rope_original_max_position: int = 65536
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rms_norm_eps: float = 1e-6
    layers: tuple[int, ...] = (10, 12, 20)
    ensemble: Literal["max", "mean"] = "max"
    threshold: float = 0.5
    hadamard: bool = True
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "q_rank", "n_heads", "head_dim", "rope_dim", "rope_original_max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise IndexerConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise IndexerConfigError(f"rope_dim must be even and at most head_dim ({self.head_dim}), "
                                     f"got {self.rope_dim}")
        for name in ("rope_theta", "rope_factor", "rope_beta_fast", "rope_beta_slow", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise IndexerConfigError(f"{name} must be a positive number, got {value!r}")
        if self.rope_theta <= 1:
            raise IndexerConfigError(f"rope_theta must be greater than 1, got {self.rope_theta!r}")
        if self.rope_factor < 1:
            raise IndexerConfigError(f"rope_factor must be >= 1 (1: no YaRN scaling), got {self.rope_factor!r}")
        if self.rope_beta_fast <= self.rope_beta_slow:
            raise IndexerConfigError(f"rope_beta_fast ({self.rope_beta_fast}) must exceed rope_beta_slow "
                                     f"({self.rope_beta_slow})")
        layers = self.layers
        if isinstance(layers, list):
            layers = tuple(layers)
            object.__setattr__(self, "layers", layers)
        if not isinstance(layers, tuple) or not layers or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
            raise IndexerConfigError(f"layers must be a non-empty list of layer indices, got {self.layers!r}")
        if len(set(layers)) != len(layers):
            raise IndexerConfigError(f"layers must not repeat, got {list(layers)}")
        if self.ensemble not in ("max", "mean"):
            raise IndexerConfigError(f"ensemble must be 'max' or 'mean', got {self.ensemble!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 < self.threshold < 1:
            raise IndexerConfigError(f"threshold must be a probability strictly between 0 and 1, got {self.threshold!r}")
        if not isinstance(self.hadamard, bool):
            raise IndexerConfigError(f"hadamard must be true or false, got {self.hadamard!r}")
        if self.hadamard and self.head_dim & (self.head_dim - 1):
            raise IndexerConfigError(f"the Hadamard rotation needs a power-of-two head_dim, got {self.head_dim}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise IndexerConfigError(f"fingerprint must be a string or None, got {self.fingerprint!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (layers as a list)."""
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LightningConfig":
        """The inverse of `to_dict`; unknown fields are an error."""
        if not isinstance(data, dict):
            raise IndexerConfigError(f"an indexer config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise IndexerConfigError(f"unknown lightning indexer config fields: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides: Any) -> "LightningConfig":
        """Read the backbone-bound fields from a Hugging Face `DeepseekV4Config`.

        Taken from the config: d_model (hidden_size), head_dim (index_head_dim), n_heads
        (index_n_heads) and q_rank (q_lora_rank) as the native indexer's sizes, rope_dim
        (qk_rope_head_dim), the RoPE parameters of the compressed branches
        (`rope_parameters["compress"]`: rope_theta and, for rope_type "yarn", factor,
        original_max_position_embeddings, beta_fast, beta_slow), rms_norm_eps, and the
        backbone fingerprint. `overrides` set any field (e.g. layers, ensemble). Every target
        layer must be a CSA layer of the config.
        """
        from ..models.loader import fingerprint

        if getattr(hf_config, "model_type", None) != "deepseek_v4":
            raise IndexerConfigError(f"the lightning indexer needs a DeepSeek-V4 config, got model_type="
                                     f"{getattr(hf_config, 'model_type', None)!r}")
        rope = (getattr(hf_config, "rope_parameters", None) or {}).get("compress")
        if not isinstance(rope, dict):
            raise IndexerConfigError("the DeepSeek-V4 config has no rope_parameters['compress'] entry")
        rope_type = rope.get("rope_type", "default")
        values: dict[str, Any] = {
            "d_model": hf_config.hidden_size, "head_dim": hf_config.index_head_dim,
            "n_heads": hf_config.index_n_heads, "q_rank": hf_config.q_lora_rank,
            "rope_dim": int(hf_config.qk_rope_head_dim), "rope_theta": float(rope["rope_theta"]),
            "rms_norm_eps": float(hf_config.rms_norm_eps), "fingerprint": fingerprint(hf_config),
            "rope_factor": 1.0,
        }
        if rope_type == "yarn":
            attention_factor = rope.get("attention_factor", 1.0)
            if attention_factor != 1.0:
                raise IndexerConfigError(f"YaRN attention_factor {attention_factor} is not supported: the release's "
                                         "indexer leaves cos/sin unscaled (DeepSeek-V4 configs use 1.0)")
            values.update(rope_factor=float(rope["factor"]),
                          rope_original_max_position=int(rope["original_max_position_embeddings"]),
                          rope_beta_fast=float(rope.get("beta_fast", 32.0)),
                          rope_beta_slow=float(rope.get("beta_slow", 1.0)))
        elif rope_type != "default":
            raise IndexerConfigError(f"unsupported rope_type {rope_type!r} for the compressed branches "
                                     "(supported: default, yarn)")
        values.update(overrides)
        cfg = cls(**values)
        layer_types = list(getattr(hf_config, "layer_types", None) or [])
        bad = [L for L in cfg.layers if L >= len(layer_types) or layer_types[L] != CSA_LAYER_TYPE]
        if bad:
            csa = [i for i, t in enumerate(layer_types) if t == CSA_LAYER_TYPE]
            raise IndexerConfigError(f"target layers {bad} are not compressed-sparse-attention layers of this "
                                     f"backbone; its CSA layers are {csa}")
        return cfg


def yarn_inv_freq(cfg: LightningConfig) -> torch.Tensor:
    """RoPE inverse frequencies [rope_dim / 2] (fp32), YaRN-scaled when cfg.rope_factor > 1.

    Pair i has base frequency theta^(-2i / rope_dim). YaRN keeps the fast-rotating pairs
    (more than beta_fast turns over the original context), divides the slow ones (fewer than
    beta_slow turns) by `factor`, and blends linearly in between. Pair index with r turns over
    the original context L: d(r) = rope_dim * ln(L / (2 pi r)) / (2 ln theta); blending runs
    from floor(d(beta_fast)) (at least 0) to ceil(d(beta_slow)) (at most rope_dim - 1), as the
    backbone rotates its keys (DeepSeek's reference and Hugging Face's DeepseekV4). The
    release's indexer caps the end at rope_dim/2 - 1 instead; the two agree at the published
    sizes (blending from pair 15 to 25 of 32) and differ only for small rope_dim, where
    matching the keys' rotation is what keeps q.k a function of distance. No attention
    scaling (mscale) is applied, as in the release.
    """
    half = cfg.rope_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    base = cfg.rope_theta ** (-2.0 * i / cfg.rope_dim)
    if cfg.rope_factor == 1:
        return base.float()

    def pair_index(turns: float) -> float:
        return cfg.rope_dim * math.log(cfg.rope_original_max_position / (2 * math.pi * turns)) / (
            2 * math.log(cfg.rope_theta))

    low = max(math.floor(pair_index(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(pair_index(cfg.rope_beta_slow)), cfg.rope_dim - 1)
    ramp = ((i - low) / max(high - low, 1)).clamp(0.0, 1.0)        # 0: keep, 1: interpolate
    return (base * (1 - ramp) + base / cfg.rope_factor * ramp).float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2 * len(inv_freq) dims of x [B, ..., dim] at positions [B].

    DeepSeek-V4's interleaved convention: consecutive channels (2i, 2i+1) form pair i.
    Angles are position * inv_freq in fp32.
    """
    rope_dim = 2 * inv_freq.numel()
    angles = positions.float().reshape(-1, *([1] * (x.dim() - 2)), 1) * inv_freq.float()   # [B, 1.., rope/2]
    cos, sin = angles.cos(), angles.sin()
    keep, rot = x[..., :-rope_dim], x[..., -rope_dim:].float()
    even, odd = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat([keep, rotated.to(x.dtype)], dim=-1)


def hadamard_matrix(dim: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix [dim, dim] (fp32, symmetric, orthogonal); dim a power of two."""
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(dim)).float()


def pack_fp8_keys(keys: torch.Tensor) -> torch.Tensor:
    """keys [..., D] -> uint8 [..., D + 4]: D float8_e4m3fn bytes, then the row's fp32 scale (native byte order)."""
    values, scale = quantize_fp8(keys.float())
    return torch.cat([values.view(torch.uint8), scale.unsqueeze(-1).contiguous().view(torch.uint8)], dim=-1)


def unpack_fp8_keys(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D + 4] -> float32 keys [..., D] (fp8 values times the fp32 scale)."""
    if packed.dtype != torch.uint8 or packed.shape[-1] <= SCALE_BYTES:
        raise ValueError(f"packed fp8 keys must be uint8 [..., D + {SCALE_BYTES}], got {packed.dtype} "
                         f"{list(packed.shape)}")
    d = packed.shape[-1] - SCALE_BYTES
    values = packed[..., :d].contiguous().view(torch.float8_e4m3fn).float()
    scale = packed[..., d:].contiguous().view(torch.float32)          # [..., 1]
    return values * scale


class Fp8KeyStore:
    """Compressed keys of one sequence at the target layers, in the release's 132-byte form.

    One uint8 [capacity, head_dim + 4] buffer per layer, grown geometrically so appends are
    amortised O(1). Keys are appended in entry order and never change (the history only grows).
    """

    def __init__(self, n_layers: int, head_dim: int, device: str | torch.device = "cpu"):
        if n_layers <= 0 or head_dim <= 0:
            raise ValueError(f"n_layers and head_dim must be positive, got {n_layers} and {head_dim}")
        self.n_layers = n_layers
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.n_entries = 0
        self._data = torch.empty(n_layers, 0, head_dim + SCALE_BYTES, dtype=torch.uint8, device=self.device)

    def _reserve(self, n: int) -> None:
        cap = self._data.shape[1]
        if n > cap:
            grown = torch.empty(self.n_layers, max(n, 2 * cap, 64), self.head_dim + SCALE_BYTES,
                                dtype=torch.uint8, device=self.device)
            grown[:, :self.n_entries] = self._data[:, :self.n_entries]
            self._data = grown

    def append_packed(self, packed: torch.Tensor) -> None:
        """Add already packed keys uint8 [n_layers, n_new, head_dim + 4] (e.g. the release's `compressed_k`)."""
        want = [self.n_layers, self.head_dim + SCALE_BYTES]
        if packed.dtype != torch.uint8 or packed.dim() != 3 or [packed.shape[0], packed.shape[2]] != want:
            raise ValueError(f"expected uint8 [{self.n_layers}, n, {self.head_dim + SCALE_BYTES}] packed keys, got "
                             f"{packed.dtype} {list(packed.shape)}")
        n_new = packed.shape[1]
        self._reserve(self.n_entries + n_new)
        self._data[:, self.n_entries:self.n_entries + n_new] = packed.to(self.device)
        self.n_entries += n_new

    def append(self, keys: torch.Tensor) -> None:
        """Quantise and add keys [n_layers, n_new, head_dim] (already Hadamard-rotated if the indexer rotates)."""
        if keys.dim() != 3 or keys.shape[0] != self.n_layers or keys.shape[2] != self.head_dim:
            raise ValueError(f"expected [{self.n_layers}, n, {self.head_dim}] keys, got {list(keys.shape)}")
        self.append_packed(pack_fp8_keys(keys.to(self.device)))

    def packed(self, n: int | None = None) -> torch.Tensor:
        """The first n (default all) entries as uint8 [n_layers, n, head_dim + 4] (a view, not a copy)."""
        n = self.n_entries if n is None else n
        if not 0 <= n <= self.n_entries:
            raise ValueError(f"the key store holds {self.n_entries} entries, {n} requested")
        return self._data[:, :n]

    def keys(self, n: int | None = None) -> torch.Tensor:
        """The first n (default all) entries dequantised: float32 [n_layers, n, head_dim]."""
        return unpack_fp8_keys(self.packed(n))

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored entries, measured on the filled part of the buffers."""
        used = self._data[:, :self.n_entries]
        return used.numel() * used.element_size()


class LightningRetriever(nn.Module):
    """The query side of one target layer; parameter names are the release's checkpoint keys."""

    def __init__(self, cfg: LightningConfig):
        super().__init__()
        self.wq_a = nn.Linear(cfg.d_model, cfg.q_rank, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(cfg.q_rank))
        self.wq_b = nn.Linear(cfg.q_rank, cfg.n_heads * cfg.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.weight_scale = cfg.head_dim ** -0.5 * cfg.n_heads ** -0.5

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                rotation: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, n_heads, head_dim] and head weights [B, n_heads] for hidden [B, d_model] at positions [B]."""
        x = hidden.float()
        low = self.wq_a(x)
        low = low * torch.rsqrt(low.pow(2).mean(-1, keepdim=True) + self.eps) * self.q_norm_weight
        q = self.wq_b(low).view(x.shape[0], self.n_heads, self.head_dim)
        q = apply_rope(q, positions, inv_freq)
        if rotation is not None:
            q = q @ rotation
        return q, self.weights_proj(x) * self.weight_scale


class LightningIndexer(nn.Module):
    """Retrievers for every target layer plus the cross-layer ensemble and the threshold rule.

    State dict keys are exactly the release's: `retrievers.l{L}.wq_a.weight`, ... (the RoPE
    frequencies and the Hadamard matrix are derived from the config and not saved).
    """

    def __init__(self, cfg: LightningConfig):
        super().__init__()
        self.cfg = cfg
        self.retrievers = nn.ModuleDict({f"l{layer}": LightningRetriever(cfg) for layer in cfg.layers})
        self.register_buffer("inv_freq", yarn_inv_freq(cfg), persistent=False)
        self.register_buffer("rotation", hadamard_matrix(cfg.head_dim) if cfg.hadamard else None, persistent=False)

    @property
    def layers(self) -> list[int]:
        """The target layers, in the order of the `hidden` and `keys` inputs."""
        return list(self.cfg.layers)

    def parameter_count(self) -> int:
        """Number of weights (all layers)."""
        return sum(p.numel() for p in self.parameters())

    def rotate_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [..., head_dim] as this indexer expects them: Hadamard-rotated when cfg.hadamard, else unchanged."""
        return keys.float() @ self.rotation if self.rotation is not None else keys.float()

    def queries(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s rotated queries [B, n_heads, head_dim] and scaled head weights [B, n_heads]."""
        return self.retrievers[f"l{layer}"](hidden, positions, self.inv_freq, self.rotation)

    def layer_logits(self, hidden: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Per-layer logits [L, B, N] = sum_h w_h * ReLU(q_h . k).

        hidden: [B, L, d_model], the hidden states at cfg.layers (in that order) of the query
        tokens; keys: float [L, N, head_dim] or packed uint8 [L, N, head_dim + 4]; positions: [B].
        """
        L = len(self.cfg.layers)
        if hidden.dim() != 3 or hidden.shape[1] != L or hidden.shape[2] != self.cfg.d_model:
            raise ValueError(f"hidden must be [B, {L}, {self.cfg.d_model}], got {list(hidden.shape)}")
        if keys.dtype == torch.uint8:
            keys = unpack_fp8_keys(keys)
        if keys.dim() != 3 or keys.shape[0] != L or keys.shape[2] != self.cfg.head_dim:
            raise ValueError(f"keys must be [{L}, N, {self.cfg.head_dim}], got {list(keys.shape)}")
        if positions.shape != (hidden.shape[0],):
            raise ValueError(f"positions must be [{hidden.shape[0]}], got {list(positions.shape)}")
        out = []
        for i, layer in enumerate(self.cfg.layers):
            q, w = self.queries(layer, hidden[:, i], positions)
            dots = F.relu(torch.einsum("bhd,nd->bnh", q, keys[i].float()))
            out.append((dots * w[:, None, :]).sum(-1))
        return torch.stack(out)

    def ensemble(self, layer_logits: torch.Tensor) -> torch.Tensor:
        """Scores [B, N] from per-layer logits [L, B, N]: max or mean of the per-layer sigmoids."""
        probs = torch.sigmoid(layer_logits)
        return probs.amax(0) if self.cfg.ensemble == "max" else probs.mean(0)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Ensembled scores [B, N] in [0, 1] (inputs as in `layer_logits`)."""
        return self.ensemble(self.layer_logits(hidden, keys, positions))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The first-level pick: a bool mask of the entries whose score exceeds cfg.threshold."""
        return scores > self.cfg.threshold
