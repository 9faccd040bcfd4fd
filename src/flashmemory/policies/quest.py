"""Quest: a training-free upper bound of q.k per chunk from per-channel key min/max."""

from __future__ import annotations

import torch

from .base import SelectionContext, SelectionPolicy

_BLOCK_CHUNKS = 128  # chunks whose keys one step of an index update reads


class QuestIndex:
    """Per-chunk key min/max of every layer for one sequence, extended as chunks complete."""

    def __init__(self) -> None:
        self.kmin: torch.Tensor | None = None  # [layers, kv_heads, chunks, head_dim]
        self.kmax: torch.Tensor | None = None

    def update(self, host_keys: torch.Tensor, n: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of the first n chunks, computing only the chunks not seen before."""
        done = 0 if self.kmin is None else self.kmin.shape[2]
        if done < n:
            mins, maxs = [] if self.kmin is None else [self.kmin], [] if self.kmax is None else [self.kmax]
            for lo in range(done, n, _BLOCK_CHUNKS):  # in blocks: a long history's keys are never copied whole
                hi = min(n, lo + _BLOCK_CHUNKS)
                keys = host_keys[:, :, lo * chunk_size: hi * chunk_size].float()
                L, H, _, D = keys.shape
                blocks = keys.reshape(L, H, hi - lo, chunk_size, D)
                mins.append(blocks.amin(3))
                maxs.append(blocks.amax(3))
            self.kmin, self.kmax = torch.cat(mins, 2), torch.cat(maxs, 2)
        return self.kmin[:, :, :n], self.kmax[:, :, :n]

    @property
    def nbytes(self) -> int:
        """Measured bytes of the bounds (kept on the host here; the Quest paper keeps them on the GPU)."""
        return sum(t.numel() * t.element_size() for t in (self.kmin, self.kmax) if t is not None)


class QuestPolicy(SelectionPolicy):
    """Scores a chunk by the largest q.k any of its keys could reach (Tang et al., 2024).

    Per layer and query head, the bound sum_d max(q_d * kmin_d, q_d * kmax_d) is turned into a
    distribution over chunks (softmax), averaged over heads; layers are combined by max.
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
            qg = q.reshape(kv_heads, -1, 1, D)                   # [kv, group, 1, D]
            bound = torch.maximum(qg * kmin[layer][:, None], qg * kmax[layer][:, None]).sum(-1)
            probs = torch.softmax(bound / D ** 0.5, dim=-1).mean(dim=(0, 1))  # [n]
            best = torch.maximum(best, probs.cpu())
        return best
