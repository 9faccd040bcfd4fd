"""Where the KV bytes live: one host mirror per sequence, and one device pool shared by all.

Both store keys and values as [layers, kv_heads, tokens, head_dim]: one page of every layer
moves with a single copy, and a layer's slice is directly what attention consumes. The device
pool is cut into fixed page slots; which slot holds which page of which sequence is decided
elsewhere (`block_pool.BlockPool` hands slots out, each sequence's `page_table.PageTable` maps
its pages to them). Nothing here decides anything: it holds bytes and copies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def text_config(model_or_config):
    """The decoder's config of a model (or of a config)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


@dataclass(frozen=True)
class LayerLayout:
    """Which attention layers keep the whole history (tiered) and which attend within a sliding window.

    Only the tiered layers' history grows with the context, so only they are mirrored on the host
    and paged on the device; a sliding layer keeps its last `window` tokens on the device.
    """

    tiered: tuple[int, ...]
    sliding: tuple[int, ...]
    window: int  # tokens a sliding layer attends to, its own included (0: no sliding layers)

    @classmethod
    def of(cls, model_or_config) -> "LayerLayout":
        cfg = text_config(model_or_config)
        n = cfg.num_hidden_layers
        window = int(getattr(cfg, "sliding_window", None) or 0)
        types = list(getattr(cfg, "layer_types", None) or [])
        if not types:  # no per-layer types: a configured window applies to every layer
            types = ["sliding_attention" if window else "full_attention"] * n
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else ()
        tiered = tuple(i for i in range(n) if i not in sliding)
        if not tiered:
            raise ValueError(f"every layer of this model attends within a {window}-token window: "
                             "there is no growing history to tier")
        return cls(tiered, sliding, window if sliding else 0)

    def row(self, layer: int) -> int:
        """Index of a layer among the layers of its kind (its row in the host mirror or a pool)."""
        return (self.sliding if layer in self.sliding else self.tiered).index(layer)


@dataclass(frozen=True)
class KVShape:
    """Shape of one token's KV across `layers` layers."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, model: torch.nn.Module, layers: int | None = None) -> "KVShape":
        """The KV shape of a transformers causal LM (its text config, the dtype of its weights), over
        `layers` layers (default: all)."""
        cfg = text_config(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers if layers is None else layers, cfg.num_key_value_heads, head_dim,
                   next(model.parameters()).dtype)


def _storage_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


class HostMirror:
    """Every token of one sequence's history, in host memory (pinned when the compute device is CUDA).

    `spill.SpilledMirror` has the same interface for a history beyond `EngineConfig.host_memory`;
    the disk-tier methods here (`attach`, `prefetch`, `join`, `close`) have nothing to do.
    """

    spills = False
    disk_bytes = 0

    def __init__(self, shape: KVShape, capacity_tokens: int, pin: bool = False):
        size = (shape.layers, shape.kv_heads, capacity_tokens, shape.head_dim)
        self.shape = shape
        self.capacity = capacity_tokens
        self.k = torch.empty(size, dtype=shape.dtype, pin_memory=pin)
        self.v = torch.empty(size, dtype=shape.dtype, pin_memory=pin)
        self.length = 0  # tokens of history written so far

    @classmethod
    def over(cls, shape: KVShape, k: torch.Tensor, v: torch.Tensor, length: int) -> "HostMirror":
        """A mirror over existing [layers, kv_heads, capacity, head_dim] tensors whose first `length` tokens
        are history (benchmarks give several sequences one synthetic history this way)."""
        mirror = cls.__new__(cls)
        mirror.shape, mirror.capacity, mirror.k, mirror.v, mirror.length = shape, k.shape[2], k, v, length
        return mirror

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write [kv_heads, n, head_dim] states at token offset `start` of one layer."""
        n = k.shape[-2]
        self.k[layer, :, start:start + n].copy_(k, non_blocking=True)
        self.v[layer, :, start:start + n].copy_(v, non_blocking=True)

    def layer_view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, kv_heads, length, head_dim] views of one layer's first `length` tokens."""
        return self.k[layer, :, :length].unsqueeze(0), self.v[layer, :, :length].unsqueeze(0)

    def span(self, start: int, n: int, write: bool = False, recall: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[layers, kv_heads, n, head_dim] views of tokens [start, start + n) (what a page copy reads or writes)."""
        return self.k[:, :, start:start + n], self.v[:, :, start:start + n]

    @property
    def keys(self) -> torch.Tensor:
        """The history's keys [layers, kv_heads, capacity, head_dim] (what policies read)."""
        return self.k

    def attach(self, log, clock) -> None:
        """Nothing to log: this mirror never touches the disk."""

    def prefetch(self, pages: list[int]) -> None:
        """Every page is in host memory already."""

    def fetch(self, pages: list[int]) -> None:
        """Every page is in host memory already."""

    def join(self) -> None:
        """No background work to wait for."""

    def close(self) -> None:
        """The tensors are freed with the mirror."""

    @property
    def nbytes(self) -> int:
        """Bytes of the history held now (the filled part)."""
        return self.length * self.shape.bytes_per_token

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the storage the mirror's tensors hold (measured)."""
        return _storage_bytes(self.k, self.v)


class DevicePool:
    """A device KV pool shared by every running sequence: `n_slots` pages of `page_size` tokens.

    The engine has one for the tiered layers' resident pages and, for a hybrid model, one for the
    sliding layers' windows (one slot of `window` tokens per sequence, used as a ring).
    """

    def __init__(self, shape: KVShape, n_slots: int, page_size: int, device: torch.device | str):
        self.shape = shape
        self.page_size = page_size
        self.device = torch.device(device)
        self.k = self.v = torch.empty(0)
        self.n_slots = 0
        self.grow(n_slots)

    def grow(self, n_slots: int) -> None:
        """Enlarge the pool to `n_slots` pages, keeping every slot's contents and id."""
        if n_slots <= self.n_slots:
            return
        size = (self.shape.layers, self.shape.kv_heads, n_slots * self.page_size, self.shape.head_dim)
        k = torch.empty(size, dtype=self.shape.dtype, device=self.device)
        v = torch.empty(size, dtype=self.shape.dtype, device=self.device)
        used = self.n_slots * self.page_size
        if used:
            k[:, :, :used].copy_(self.k)
            v[:, :, :used].copy_(self.v)
        self.k, self.v, self.n_slots = k, v, n_slots

    @property
    def page_bytes(self) -> int:
        """Bytes of one page slot (all layers, K and V)."""
        return self.page_size * self.shape.bytes_per_token

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the storage the pool's tensors hold (measured, not derived)."""
        return _storage_bytes(self.k, self.v)

    def token_index(self, slots: list[int], device: torch.device | None = None) -> torch.Tensor:
        """Pool token positions of whole page slots, in the given order."""
        p = self.page_size
        base = torch.tensor(slots, dtype=torch.long) * p
        return (base[:, None] + torch.arange(p)).flatten().to(device or self.device)

    def write_rows(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one new token per row: k, v [B, kv_heads, 1, head_dim] at pool token `positions` [B]."""
        self.k[layer].index_copy_(1, positions, k[:, :, 0].transpose(0, 1))
        self.v[layer].index_copy_(1, positions, v[:, :, 0].transpose(0, 1))

    def gather(self, layer: int, index: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Fill out_k/out_v [B, kv_heads, T, head_dim] with the pool tokens `index` [B, T] of one layer."""
        for row in range(index.shape[0]):
            torch.index_select(self.k[layer], 1, index[row], out=out_k[row])
            torch.index_select(self.v[layer], 1, index[row], out=out_v[row])

    def load(self, slot: int, offset: int, k: torch.Tensor, v: torch.Tensor, non_blocking: bool) -> int:
        """Copy host tokens k, v [layers, kv_heads, n, head_dim] into a slot at `offset`; return bytes moved."""
        n = k.shape[2]
        dst = slice(slot * self.page_size + offset, slot * self.page_size + offset + n)
        self.k[:, :, dst].copy_(k, non_blocking=non_blocking)
        self.v[:, :, dst].copy_(v, non_blocking=non_blocking)
        return n * self.shape.bytes_per_token

    def store(self, slot: int, offset: int, k: torch.Tensor, v: torch.Tensor, non_blocking: bool) -> int:
        """Copy n tokens of a slot (from `offset`) into host tensors k, v [layers, kv_heads, n, head_dim]."""
        n = k.shape[2]
        src = slice(slot * self.page_size + offset, slot * self.page_size + offset + n)
        k.copy_(self.k[:, :, src], non_blocking=non_blocking)
        v.copy_(self.v[:, :, src], non_blocking=non_blocking)
        return n * self.shape.bytes_per_token
