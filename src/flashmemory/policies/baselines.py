"""Training-free reference policies: full, recency, streaming and random."""

from __future__ import annotations

import torch

from .base import SelectionContext, SelectionPolicy


class FullPolicy(SelectionPolicy):
    """Every page resident: the dense baseline through the same runtime."""

    name = "full"
    mode = "all"

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        return torch.ones(ctx.n_chunks)


class RecencyPolicy(SelectionPolicy):
    """The newest chunks fill the whole budget (no attention sink)."""

    name = "recency"
    keep_sink = False

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        return torch.arange(ctx.n_chunks, dtype=torch.float32)


class StreamingPolicy(RecencyPolicy):
    """StreamingLLM: attention-sink pages plus a window of the newest chunks."""

    name = "streaming"
    keep_sink = True


class RandomPolicy(SelectionPolicy):
    """Sink + tail, and the rest of the budget drawn at random each cycle (seeded)."""

    name = "random"

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        return torch.rand(ctx.n_chunks, generator=ctx.generator)
