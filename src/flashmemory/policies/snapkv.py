"""SnapKV (Li et al., 2024) as an eviction policy over chunks.

The last `config.observation_window` prompt tokens (the observation window; the question sits
there) vote for the keys they attend to: per layer and KV head, the window's attention
probabilities are summed over the window's tokens and averaged over the query heads of the
group, then max-pooled over neighbouring keys (SnapKV's clustering). A chunk's score is the sum
of its keys' pooled votes at the KV head and layer that vote for it most: SnapKV keeps each
head's own top keys, and one resident set shared by every head keeps a chunk that any head
wants (an average over heads lets a few chunks that every head glances at crowd out the one a
retrieval head needs). It evicts: the pages it keeps at
the first cycle are all it ever sees of the prompt (`base.Eviction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..runtime.attention_mass import causal_attention, chunk_mass
from .base import SelectionContext, SelectionPolicy


@dataclass
class SnapKVPolicy(SelectionPolicy):
    """Keeps the chunks the prompt's last tokens attend to most; decides once, never recalls."""

    name = "snapkv"
    evicts = True
    kernel_size: int = 7  # keys pooled together (odd), SnapKV's clustering of neighbouring keys

    def __post_init__(self) -> None:
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size <= 0 \
                or self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv's kernel_size must be a positive odd integer, got {self.kernel_size!r}")

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.activations is None:
            raise RuntimeError("snapkv needs the prompt's last tokens' attention inputs; run it through LSAEngine")
        n_window = min(ctx.config.observation_window, ctx.activations.tokens, ctx.length)
        window = ctx.activations.last(n_window)
        keep = ctx.n_chunks * ctx.config.chunk_size
        best = torch.zeros(ctx.n_chunks)
        for row, q in enumerate(window.queries(ctx.key_layers)):
            k = ctx.host_keys[row, :, :ctx.length].to(q.device)
            votes = causal_attention(q, k, ctx.length - n_window).sum(2).mean(1)  # [kv_heads, T]
            votes = F.max_pool1d(votes[:, None], self.kernel_size, stride=1, padding=self.kernel_size // 2)[:, 0]
            best = torch.maximum(best, chunk_mass(votes[:, :keep], ctx.config.chunk_size).amax(0).cpu())
        return best
