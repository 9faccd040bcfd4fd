"""The "lightning index": compressed keys of every chunk and target layer, so scoring the
whole history is one batched product.

A compressed key at a layer is the mean of the post-RoPE keys of a block of `key_block`
tokens per KV head, the KV heads concatenated ([kv_heads * head_dim]); a chunk has
chunk_size / key_block of them (measured on SmolLM2: a needle's chunk ranks near the top
with 8-token blocks under the backbone's own queries, and near the bottom with one mean over
32 tokens). Only complete chunks have keys; the unfinished chunk is in the always-resident
open region anyway. Keys are computed once per chunk and kept (the history only grows) in fp16, as the
trace dump stores them for training (2 * key_dim bytes each), or optionally as fp8 (e4m3)
values plus one fp32 scale per key (4 + key_dim bytes).
"""

from __future__ import annotations

import torch

_BLOCK_CHUNKS = 128  # chunks whose host keys one step of `extend_from_host` reads

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def compress_keys(keys: torch.Tensor, block: int) -> torch.Tensor:
    """Mean keys of the complete blocks: keys [..., kv_heads, T, head_dim] -> [..., T // block, kv_heads * head_dim]."""
    *lead, kv, T, D = keys.shape
    n = T // block
    blocks = keys[..., : n * block, :].float().reshape(*lead, kv, n, block, D).mean(-2)
    return blocks.movedim(-3, -2).reshape(*lead, n, kv * D)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 values and fp32 scales: x [..., D] -> (values [..., D] fp8, scale [...])."""
    scale = x.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    return (x / scale[..., None]).to(torch.float8_e4m3fn), scale.float()


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale[..., None]


class ChunkKeyStore:
    """Compressed keys of the complete chunks of one sequence, at the indexer's target layers."""

    def __init__(self, layers: list[int], key_dim: int, chunk_size: int, fp8: bool = False,
                 device: str | torch.device = "cpu", key_block: int | None = None):
        self.layers = list(layers)
        self.key_dim = key_dim
        self.chunk_size = chunk_size
        self.key_block = key_block or chunk_size
        if chunk_size % self.key_block:
            raise ValueError(f"chunk_size {chunk_size} is not a multiple of key_block {self.key_block}")
        self.per_chunk = chunk_size // self.key_block
        self.fp8 = fp8
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget all chunks (a new sequence)."""
        self.n_chunks = 0
        dtype = torch.float8_e4m3fn if self.fp8 else torch.float16
        self._values = torch.empty(len(self.layers), 0, self.key_dim, dtype=dtype, device=self.device)
        self._scale = torch.empty(len(self.layers), 0, device=self.device) if self.fp8 else None

    def _reserve(self, n: int) -> None:
        cap = self._values.shape[1]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 64)  # geometric growth: appends stay amortised O(1)
        values = torch.empty(len(self.layers), new_cap, self.key_dim, dtype=self._values.dtype, device=self.device)
        values[:, :cap] = self._values
        self._values = values
        if self.fp8:
            scale = torch.empty(len(self.layers), new_cap, device=self.device)
            scale[:, :cap] = self._scale
            self._scale = scale

    def append(self, chunk_keys: torch.Tensor) -> None:
        """Add compressed keys [layers, n_new * per_chunk, key_dim] of the next chunks."""
        L, rows, D = chunk_keys.shape
        if L != len(self.layers) or D != self.key_dim or rows % self.per_chunk:
            raise ValueError(f"expected [{len(self.layers)}, n * {self.per_chunk}, {self.key_dim}] keys, "
                             f"got {list(chunk_keys.shape)}")
        n_new = rows // self.per_chunk
        self._reserve((self.n_chunks + n_new) * self.per_chunk)
        span = slice(self.n_chunks * self.per_chunk, (self.n_chunks + n_new) * self.per_chunk)
        chunk_keys = chunk_keys.to(self.device)
        if self.fp8:
            self._values[:, span], self._scale[:, span] = quantize_fp8(chunk_keys.float())
        else:
            self._values[:, span] = chunk_keys.half()
        self.n_chunks += n_new

    def extend_from_host(self, host_keys: torch.Tensor, length: int, rows: list[int] | None = None) -> None:
        """Compress the chunks completed since the last call from host keys [layers, kv_heads, >=length, head_dim]
        (`rows`: the host rows of this store's layers, when the host holds only some layers)."""
        done, total = self.n_chunks, length // self.chunk_size
        if total <= done:
            return
        c, rows = self.chunk_size, self.layers if rows is None else rows
        for lo in range(done, total, _BLOCK_CHUNKS):  # only the new complete chunks, a block at a time
            hi = min(total, lo + _BLOCK_CHUNKS)
            self.append(compress_keys(host_keys[rows, :, lo * c: hi * c], self.key_block))

    def keys(self, n: int | None = None) -> torch.Tensor:
        """[layers, n * per_chunk, key_dim] float32 keys of the first n (default all) chunks."""
        n = self.n_chunks if n is None else n
        if n > self.n_chunks:
            raise ValueError(f"the key store holds {self.n_chunks} chunks, {n} requested")
        rows = n * self.per_chunk
        if self.fp8:
            return dequantize_fp8(self._values[:, :rows], self._scale[:, :rows])
        return self._values[:, :rows].float()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys (values plus fp8 scales), measured on the tensors' filled part."""
        rows = self.n_chunks * self.per_chunk
        used = [self._values[:, :rows]] + ([self._scale[:, :rows]] if self.fp8 else [])
        return sum(t.numel() * t.element_size() for t in used)
