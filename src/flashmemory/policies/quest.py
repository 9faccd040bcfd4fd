"""Quest: a training-free upper bound of q.k per chunk from per-channel key min/max."""

from __future__ import annotations

import torch

from .base import SelectionContext, SelectionPolicy


class QuestPolicy(SelectionPolicy):
    """Scores a chunk by the largest q.k any of its keys could reach (Tang et al., 2024).

    Per layer and query head, the bound sum_d max(q_d * kmin_d, q_d * kmax_d) is turned into a
    distribution over chunks (softmax), averaged over heads; layers are combined by max.
    The per-chunk min/max metadata is computed once per chunk and kept across cycles.
    """

    name = "quest"
    needs_queries = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._kmin: torch.Tensor | None = None  # [layers, kv_heads, chunks, head_dim]
        self._kmax: torch.Tensor | None = None

    def _metadata(self, ctx: SelectionContext) -> tuple[torch.Tensor, torch.Tensor]:
        c, n = ctx.config.chunk_size, ctx.n_chunks
        done = 0 if self._kmin is None else self._kmin.shape[2]
        if done < n:
            keys = ctx.host_keys[:, :, done * c: n * c].float()
            L, H, _, D = keys.shape
            blocks = keys.reshape(L, H, n - done, c, D)
            kmin, kmax = blocks.amin(3), blocks.amax(3)
            self._kmin = kmin if self._kmin is None else torch.cat([self._kmin, kmin], 2)
            self._kmax = kmax if self._kmax is None else torch.cat([self._kmax, kmax], 2)
        return self._kmin[:, :, :n], self._kmax[:, :, :n]

    def index_bytes(self) -> int:
        """Per-chunk key min/max of every layer (kept on the host here; the Quest paper keeps them on the GPU)."""
        return sum(t.numel() * t.element_size() for t in (self._kmin, self._kmax) if t is not None)

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        kmin, kmax = self._metadata(ctx)
        queries = ctx.recorder.queries()  # per layer [1, heads, head_dim]
        L, kv_heads, n, D = kmin.shape
        best = torch.full((n,), float("-inf"))
        for layer, q in enumerate(queries):
            q = q[-1].float().to(kmin.device)                    # [heads, D]
            qg = q.reshape(kv_heads, -1, 1, D)                   # [kv, group, 1, D]
            bound = torch.maximum(qg * kmin[layer][:, None], qg * kmax[layer][:, None]).sum(-1)
            probs = torch.softmax(bound / D ** 0.5, dim=-1).mean(dim=(0, 1))  # [n]
            best = torch.maximum(best, probs.cpu())
        return best
