"""Quest: a training-free upper bound of q.k per chunk from per-channel key min/max."""

from __future__ import annotations

import torch

from .base import SelectionContext, SelectionPolicy

_BLOCK_CHUNKS = 128  # chunks whose keys one step of an index update reads


class QuestIndex:
    """Per-chunk key min/max of every layer for one sequence, extended as chunks complete.

    The bounds live in buffers sized for every chunk the history can hold (its mirror's capacity), so
    extending a long history's index by the chunks of one cycle writes only those chunks.
    """

    def __init__(self) -> None:
        self._kmin: torch.Tensor | None = None  # [layers, kv_heads, capacity, head_dim]
        self._kmax: torch.Tensor | None = None
        self.chunks = 0

    def _reserve(self, like: torch.Tensor, n: int, capacity: int) -> None:
        if self._kmin is not None and self._kmin.shape[2] >= n:
            return
        L, H, _, D = like.shape
        capacity = max(n, capacity, 2 * (0 if self._kmin is None else self._kmin.shape[2]))
        kmin, kmax = like.new_empty((L, H, capacity, D)), like.new_empty((L, H, capacity, D))
        if self._kmin is not None:
            kmin[:, :, : self.chunks] = self._kmin[:, :, : self.chunks]
            kmax[:, :, : self.chunks] = self._kmax[:, :, : self.chunks]
        self._kmin, self._kmax = kmin, kmax

    def update(self, host_keys: torch.Tensor, n: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds [layers, kv_heads, n, head_dim] of the first n chunks, computing only the chunks not seen before."""
        for lo in range(self.chunks, n, _BLOCK_CHUNKS):  # in blocks: a long history's keys are never copied whole
            hi = min(n, lo + _BLOCK_CHUNKS)
            keys = host_keys[:, :, lo * chunk_size: hi * chunk_size].float()
            L, H, _, D = keys.shape
            blocks = keys.reshape(L, H, hi - lo, chunk_size, D)
            self._reserve(keys, n, host_keys.shape[2] // chunk_size)
            torch.amin(blocks, 3, out=self._kmin[:, :, lo:hi])
            torch.amax(blocks, 3, out=self._kmax[:, :, lo:hi])
            self.chunks = hi
        if self._kmin is None:
            raise ValueError("quest's index is empty: no complete chunk in the history")
        return self._kmin[:, :, :n], self._kmax[:, :, :n]

    @property
    def nbytes(self) -> int:
        """Measured bytes of the bounds' buffers (kept on the host here; the Quest paper keeps them on the GPU)."""
        return sum(t.numel() * t.element_size() for t in (self._kmin, self._kmax) if t is not None)


class QuestPolicy(SelectionPolicy):
    """Scores a chunk by the largest q.k any of its keys could reach (Tang et al., 2024).

    Per layer and query head, the bound sum_d max(q_d * kmin_d, q_d * kmax_d) is turned into a
    distribution over chunks (softmax), averaged over heads; layers are combined by max. The bound
    is computed as relu(q) . kmax - relu(-q) . kmin: two matrix products, no [chunks, head_dim] temporary.
    """

    name = "quest"

    def new_index(self, ctx: SelectionContext) -> QuestIndex:
        return QuestIndex()

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        kmin, kmax = ctx.index.update(ctx.host_keys, ctx.n_chunks, ctx.config.chunk_size)
        queries = ctx.activations.queries(ctx.key_layers)  # per tiered layer [tokens, heads, head_dim]
        L, kv_heads, n, D = kmin.shape
        best = torch.full((n,), float("-inf"))
        for layer, q in enumerate(queries):
            q = q[-1].float().to(kmin.device)                    # [heads, D]
            qg = q.reshape(kv_heads, -1, D)                      # [kv, group, D]
            bound = (torch.matmul(qg.clamp(min=0), kmax[layer].transpose(1, 2))
                     + torch.matmul(qg.clamp(max=0), kmin[layer].transpose(1, 2)))  # [kv, group, n]
            probs = torch.softmax(bound / D ** 0.5, dim=-1).mean(dim=(0, 1))  # [n]
            best = torch.maximum(best, probs.cpu())
        return best
