"""Where the KV bytes live: the host mirror (every token) and the device reserve (resident pages).

Both pools store keys and values as [layers, kv_heads, tokens, head_dim] so one page of every
layer moves with a single copy, and a layer's slice is directly the
[1, kv_heads, tokens, head_dim] view that attention consumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    """Shape of one token's KV across the model."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class KVPool:
    """A fixed-capacity pair of K/V tensors on one device."""

    def __init__(self, shape: KVShape, capacity_tokens: int, device: torch.device, pin: bool = False):
        size = (shape.layers, shape.kv_heads, capacity_tokens, shape.head_dim)
        self.shape = shape
        self.capacity = capacity_tokens
        self.device = torch.device(device)
        self.k = torch.empty(size, dtype=shape.dtype, device=device, pin_memory=pin)
        self.v = torch.empty(size, dtype=shape.dtype, device=device, pin_memory=pin)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the storage these tensors actually hold (measured, not derived)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def layer_view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, kv_heads, length, head_dim] views of one layer's first `length` tokens."""
        return self.k[layer, :, :length].unsqueeze(0), self.v[layer, :, :length].unsqueeze(0)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write [1, kv_heads, n, head_dim] states at token offset `start` of one layer."""
        n = k.shape[-2]
        self.k[layer, :, start:start + n].copy_(k[0], non_blocking=True)
        self.v[layer, :, start:start + n].copy_(v[0], non_blocking=True)

    def copy_from(self, src: "KVPool", src_start: int, dst_start: int, n: int, non_blocking: bool = False) -> int:
        """Copy tokens [src_start, src_start+n) of every layer from `src`; return bytes moved."""
        for mine, theirs in ((self.k, src.k), (self.v, src.v)):
            mine[:, :, dst_start:dst_start + n].copy_(theirs[:, :, src_start:src_start + n], non_blocking=non_blocking)
        return n * self.shape.bytes_per_token

    def move(self, src_start: int, dst_start: int, n: int) -> None:
        """Move tokens inside this pool (page-aligned ranges never overlap)."""
        for t in self.tensors():
            t[:, :, dst_start:dst_start + n].copy_(t[:, :, src_start:src_start + n])


class HostMirror(KVPool):
    """Every token of the history, in host memory (pinned when the compute device is CUDA)."""

    def __init__(self, shape: KVShape, capacity_tokens: int, compute_device: torch.device):
        pin = torch.device(compute_device).type == "cuda"
        super().__init__(shape, capacity_tokens, torch.device("cpu"), pin=pin)
        self.length = 0  # tokens of history written so far


class DeviceReserve(KVPool):
    """The fixed-capacity device pool: resident pages first, then the open region of the cycle."""

    def __init__(self, shape: KVShape, capacity_pages: int, page_size: int, device: torch.device):
        super().__init__(shape, capacity_pages * page_size, device)
        self.capacity_pages = capacity_pages
        self.page_size = page_size
